"""Export an embedder of the first ``m`` dimensions to ONNX or TorchScript: ``mrl-vision export``.

    mrl-vision export --ckpt_path runs/quickstart/version_0 --dim 64 --out emb64.onnx
    mrl-vision export --ckpt_path my_model/ --dim 128 --normalize --format torchscript --out emb128.pt

The exported network takes images ``[N, C, H, W]`` (float32, RGB in [0, 1] resized to the model's
``input_size`` and normalised per channel with its ``mean``/``std``: the preprocessing is not part of
the file) and returns ``MatryoshkaModel.features(x)[:, :m]`` ``[N, m]``, L2-normalised per row with
``--normalize``. (For an ``ff_projection`` head the embedding is its learned projection.) What a user
needs to feed it is recorded in the file (ONNX ``metadata_props``, each value JSON-encoded;
TorchScript ``_extra_files["mrl_vision.json"]``) and in a sidecar ``FILE.json``.

The file is written to a temporary name beside ``FILE``, run once (ONNX Runtime on the CPU, or
``torch.jit.load``) on random inputs and compared with the PyTorch model, and renamed into place only
when they agree. ONNX goes through torch's ``dynamo=True`` exporter (the supported one, which needs
``onnxscript``); when it fails for a backbone, the legacy TorchScript-based exporter is tried and the
fallback reported. ONNX export needs the ``export`` extra: ``pip install "mrl-vision[export]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .files import atomic_path, atomic_write_text, file_checksum
from .model import MatryoshkaModel

FORMATS = ("onnx", "torchscript")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
            ".torchscript": "torchscript", ".jit": "torchscript"}
KIND = "mrl-vision-embedder"
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
EXTRA_FILE = "mrl_vision.json"  # the TorchScript extra file holding the metadata
TOLERANCE = 1e-4  # the check's largest |exported - PyTorch|, relative to the output's scale (at least 1)
ONNX_LIMIT = 2**31 - 2**25  # protobuf's 2 GiB, less room for the graph
INSTALL_HINT = 'pip install "mrl-vision[export]"'


class ExportWarning(UserWarning):
    """Something a user should know about an export that still succeeds (a size the model was not
    trained at, a missing normalisation, the fallback exporter)."""


class ExportError(RuntimeError):
    """The exporter failed, or the exported file does not compute what the PyTorch model computes."""


# ----------------------------------------------------------------------------- the embedder
def embedding_width(model: MatryoshkaModel) -> int:
    """How many dimensions the model's embedding has: the backbone's width, or the output size of
    an ``ff_projection`` head's projection."""
    projection = _projection(model)
    return projection.out_features if projection is not None else model.width


def _projection(model: MatryoshkaModel) -> nn.Linear | None:
    return getattr(model.head, "projection", None) if model.head is not None else None


def check_dim(model: MatryoshkaModel, dim: int) -> int:
    """``dim`` as an int in [1, width]; ``ValueError`` naming it otherwise. A size the model was not
    trained at (not in ``model.dims``) is allowed, with an :class:`ExportWarning`."""
    width = embedding_width(model)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"--dim must be an integer in [1, {width}], got {dim!r}")
    if not 1 <= dim <= width:
        raise ValueError(f"--dim {dim} is out of range: this {model.backbone_name} embedding has {width} "
                         f"dimensions, so give 1 to {width} (trained sizes: {model.dims})")
    if dim not in model.dims:
        warnings.warn(f"dim {dim} is not one of the sizes this model was trained at {model.dims}: only those "
                      "were trained to be embeddings by themselves; the first "
                      f"{dim} dimensions are exported anyway", ExportWarning, stacklevel=3)
    return dim


class MatryoshkaEmbedder(nn.Module):
    """The first ``dim`` dimensions of a :class:`MatryoshkaModel`'s embedding, ``[N, C, H, W] -> [N, dim]``
    (``model.features(x)[:, :dim]``; for an ``ff_projection`` head, its projection's), L2-normalised
    per row when ``normalize``. Built in eval mode (which puts the model's backbone in eval mode);
    it holds the backbone (and projection) only, not the classifier.

    Example::

        embedder = MatryoshkaEmbedder(model, dim=64, normalize=True)
        e = embedder(images)   # [N, 64], unit rows
    """

    def __init__(self, model: MatryoshkaModel, dim: int, normalize: bool = False) -> None:
        super().__init__()
        self.dim = check_dim(model, dim)
        self.normalize = bool(normalize)
        self.backbone = model.backbone
        self.projection = _projection(model)
        self.channels_last = bool(model.channels_last)
        self.width = model.width
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        z = self.backbone(images)  # as MatryoshkaModel.features, without its shape check (which tracing would bake in)
        if self.projection is not None:
            z = self.projection(z)
        e = z[:, : self.dim]
        return nn.functional.normalize(e, dim=-1) if self.normalize else e

    def extra_repr(self) -> str:
        return f"dim={self.dim}, normalize={self.normalize}"


def reference_embedding(model: MatryoshkaModel, x: torch.Tensor, dim: int, normalize: bool) -> torch.Tensor:
    """What the exported file must compute, from the model's own API: ``model.embed`` at a trained
    size, else ``model.features`` (through an ``ff_projection`` head's projection) cut to ``dim``."""
    with torch.no_grad():
        if dim in model.dims:
            return model.embed(x, dim, normalize=normalize)
        z = model.features(x)
        projection = _projection(model)
        e = (projection(z) if projection is not None else z)[:, :dim]
        return nn.functional.normalize(e, dim=-1) if normalize else e


# ----------------------------------------------------------------------------- export
def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, with ``onnxscript`` importable too (the dynamo exporter needs it);
    ``ImportError`` naming the install command otherwise."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}): {INSTALL_HINT}") from None
    return onnx, onnxruntime


def sidecar_path(path: str | os.PathLike) -> Path:
    """``FILE.json`` beside the exported ``FILE``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def check_outputs(path: str | os.PathLike, overwrite: bool = False) -> None:
    """``FileExistsError`` when ``path`` or its sidecar exists and ``overwrite`` is not set;
    ``ValueError`` when ``path`` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder: give the file to write")
    if overwrite:
        return
    for p, what in ((path, "--out"), (sidecar_path(path), "its sidecar")):
        if p.exists():
            raise FileExistsError(f"{what} {str(p)!r} already exists: remove it or pass --overwrite")


def format_of(path: str | os.PathLike, format: str | None) -> str:
    """``format``, or the one the file name's suffix says (``.onnx``; ``.pt``, ``.ts``, ...)."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot tell the format from {str(path)!r}: give --format onnx or --format torchscript")
    return SUFFIXES[suffix]


def _input_shape(model: MatryoshkaModel) -> tuple[list[float] | int, int, int, int]:
    """``(input_size as recorded, channels, height, width)``: the model's ``input_size``, else the
    timm backbone's default (with an :class:`ExportWarning`)."""
    channels = int(model.config.get("backbone_kwargs", {}).get("in_chans", 3))
    if model.input_size is not None:
        return model.input_size, channels, model.input_size, model.input_size
    cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    _, h, w = cfg.get("input_size", (channels, 224, 224))
    warnings.warn(f"the model records no input_size; exported and checked at the backbone's default {h}x{w}",
                  ExportWarning, stacklevel=3)
    return (h if h == w else [h, w]), channels, h, w


def embedder_metadata(model: MatryoshkaModel, dim: int, normalize: bool = False, format: str = "onnx",
                      dynamic_batch: bool = True) -> dict[str, Any]:
    """What a user of the exported file needs: the preprocessing (``input_size``, ``mean``, ``std``),
    what comes out (``dim`` of ``width``, ``normalize``) and where it comes from."""
    from . import __version__

    input_size, channels, h, w = _input_shape(model)
    if model.mean is None or model.std is None:
        warnings.warn("the model records no mean/std: the metadata holds null; normalise inputs as the model "
                      "was trained", ExportWarning, stacklevel=3)
    batch: int | str = "N" if dynamic_batch else 1
    return {
        "kind": KIND,
        "format": format,
        "backbone": model.backbone_name,
        "layers": model.config["layers"],
        "head": model.head_kind,
        "dims": list(model.dims),
        "width": embedding_width(model),
        "dim": dim,
        "trained_dim": dim in model.dims,
        "normalize": bool(normalize),
        "input_size": input_size,
        "mean": model.mean,
        "std": model.std,
        "input": {"name": INPUT_NAME, "shape": [batch, channels, h, w], "dtype": "float32",
                  "preprocessing": "RGB in [0, 1] at input_size, then (x - mean) / std per channel"},
        "output": {"name": OUTPUT_NAME, "shape": [batch, dim], "dtype": "float32",
                   "what": ("L2-normalised " if normalize else "") + f"first {dim} dimensions of the embedding"},
        "dynamic_batch": bool(dynamic_batch),
        "mrl_vision_version": __version__,
        "torch_version": torch.__version__,
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' warnings and progress output, hidden (the numerical check judges the result)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _write_onnx(embedder: nn.Module, example: torch.Tensor, path: Path, opset: int | None,
                dynamic_batch: bool, metadata: dict[str, Any]) -> None:
    """``path``: the embedder as ONNX (dynamo exporter, else the legacy one) with ``metadata`` in its
    ``metadata_props``; adds ``onnx_exporter`` and ``opset`` to ``metadata``."""
    onnx, _ = require_onnx()
    size = sum(t.numel() * t.element_size() for t in (*embedder.parameters(), *embedder.buffers()))
    if size >= ONNX_LIMIT:
        raise ExportError(f"the weights of {metadata['backbone']} take {size / 2**30:.1f} GiB: an ONNX file holds at "
                          "most 2 GiB without external data files, which this command does not write; export "
                          "--format torchscript instead")
    failures = []
    try:
        with _quiet():
            program = torch.onnx.export(
                embedder, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
                opset_version=opset, optimize=True, verbose=False,
            )
            program.save(str(path), external_data=False)
        exporter = "dynamo"
    except Exception as e:  # noqa: BLE001 - any failure of the new exporter: try the legacy one
        failures.append(f"dynamo exporter: {_first_line(e)}")
        try:
            with _quiet():
                torch.onnx.export(
                    embedder, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], opset_version=opset,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
                )
            exporter = "legacy"
        except Exception as e2:  # noqa: BLE001
            failures.append(f"legacy exporter: {_first_line(e2)}")
            raise ExportError(f"ONNX export of {metadata['backbone']} failed ({'; '.join(failures)})") from None
        warnings.warn(f"the dynamo ONNX exporter failed ({failures[0]}); used the legacy TorchScript-based one",
                      ExportWarning, stacklevel=3)
    proto = onnx.load(str(path))
    metadata["onnx_exporter"] = exporter
    metadata["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
    proto.doc_string = (f"mrl-vision embedder: {metadata['output']['what']} of {metadata['backbone']} "
                        f"(metadata_props values are JSON)")
    onnx.save(proto, str(path))


def _write_torchscript(embedder: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    """``path``: the traced embedder with ``metadata`` as its extra file ``mrl_vision.json``."""
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(embedder, (example,), check_trace=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"TorchScript tracing of {metadata['backbone']} failed ({_first_line(e)})") from None
    with _quiet():  # torch.jit's deprecation notices
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(metadata)})


def _onnx_runner(path: Path, metadata: dict[str, Any]) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    _, ort = require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stored = session.get_modelmeta().custom_metadata_map
    if json.loads(stored.get("dim", "null")) != metadata["dim"]:
        raise ExportError(f"the exported file's metadata does not hold dim {metadata['dim']}")
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run, f"onnxruntime {ort.__version__} (CPUExecutionProvider)"


def _torchscript_runner(path: Path, metadata: dict[str, Any]) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    extra = {EXTRA_FILE: ""}
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if json.loads(extra[EXTRA_FILE] or "{}").get("dim") != metadata["dim"]:
        raise ExportError(f"the exported file's metadata does not hold dim {metadata['dim']}")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run, "torch.jit.load"


def check_export(run: Callable[[torch.Tensor], torch.Tensor], model: MatryoshkaModel, dim: int, normalize: bool,
                 shape: Sequence[int], batch_sizes: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Run ``run`` (the exported file) and the PyTorch model on random inputs of ``shape`` (C, H, W)
    at each batch size: the largest absolute difference and the tolerance (``TOLERANCE`` times the
    output's scale, at least 1); :class:`ExportError` when they disagree or the shape is wrong."""
    gen = torch.Generator().manual_seed(seed)
    diff, scale = 0.0, 0.0
    for n in batch_sizes:
        x = torch.randn(n, *shape, generator=gen)
        expected = reference_embedding(model, x, dim, normalize).float()
        got = run(x)
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(f"the exported file returned shape {list(got.shape)} for a batch of {n}, "
                              f"expected {list(expected.shape)}")
        d = float((got.float() - expected).abs().max())
        diff = d if d != d else max(diff, d)  # NaN sticks
        scale = max(scale, float(expected.abs().max()))
    tolerance = TOLERANCE * max(1.0, scale)
    if not diff <= tolerance:
        raise ExportError(f"the exported file differs from the PyTorch model by {diff:.3g} (max abs, batches "
                          f"{list(batch_sizes)}), more than the tolerance {tolerance:.3g}; nothing was written")
    return {"max_abs_diff": diff, "tolerance": tolerance, "checked_batch_sizes": list(batch_sizes)}


def export_embedder(model: MatryoshkaModel, path: str | os.PathLike, dim: int, format: str = "onnx",
                    normalize: bool = False, opset: int | None = None, dynamic_batch: bool = True,
                    overwrite: bool = False, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``MatryoshkaEmbedder(model, dim, normalize)`` to ``path`` (``format`` ``onnx`` or
    ``torchscript``) with its metadata inside and in ``path.json``; check it against the model.

    The file is written under a temporary name in the same folder and renamed onto ``path`` only
    after it has been loaded back (ONNX Runtime on the CPU / ``torch.jit.load``) and its output on
    random batches (2 and 3 images; 1 with ``dynamic_batch=False``, which fixes the batch at 1)
    matched the PyTorch model's within ``TOLERANCE`` relative to the output's scale. Returns the
    metadata with the check's ``max_abs_diff``, ``tolerance``, ``file_size`` and ``sha256`` (the
    sidecar's content). ``opset`` applies to ONNX (default: the exporter's). The export runs on a
    float32 CPU copy when the model is elsewhere; the model is left in the mode it was in.

    Raises ``ValueError`` (a bad ``dim``/``format``/``opset``), ``FileExistsError`` (``path`` or its
    sidecar exists and not ``overwrite``), ``ImportError`` (ONNX without the ``export`` extra) and
    :class:`ExportError` (the exporter failed or the check did not pass).

    Example::

        info = export_embedder(model, "emb64.onnx", 64, normalize=True)
        info["max_abs_diff"]   # ~1e-7
    """
    path = Path(path)
    format = format_of(path, format)
    if opset is not None and format != "onnx":
        raise ValueError("--opset applies to --format onnx only")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ValueError(f"--opset must be an ONNX opset version (an integer, e.g. 18), got {opset!r}")
    check_outputs(path, overwrite)
    if format == "onnx":
        require_onnx()
    check_dim(model, dim)
    metadata = embedder_metadata(model, dim, normalize, format, dynamic_batch)
    metadata.update(extra_metadata or {})
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    was_training = model.training
    target = model if on_cpu else copy.deepcopy(model).to("cpu", torch.float32)
    try:
        target.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)  # check_dim warned above already
            embedder = MatryoshkaEmbedder(target, dim, normalize)
        shape = tuple(metadata["input"]["shape"][1:])
        batch_sizes = (2, 3) if dynamic_batch else (1,)
        example = torch.randn(batch_sizes[0], *shape, generator=torch.Generator().manual_seed(1))
        with atomic_path(path) as tmp:
            if format == "onnx":
                _write_onnx(embedder, example, tmp, opset, dynamic_batch, metadata)
                run, runtime = _onnx_runner(tmp, metadata)
            else:
                _write_torchscript(embedder, example, tmp, metadata)
                run, runtime = _torchscript_runner(tmp, metadata)
            result = check_export(run, target, dim, normalize, shape, batch_sizes)
            del run  # closes the session / module on the temporary file before it is renamed
            info = {**metadata, **result, "check_runtime": runtime, "file": path.name,
                    "file_size": tmp.stat().st_size, "sha256": file_checksum(tmp, "sha256").split(":", 1)[1]}
            atomic_write_text(sidecar_path(path), json.dumps(info, indent=2) + "\n")
    finally:
        model.train(was_training)
    return info


# ----------------------------------------------------------------------------- the command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrl-vision export",
        description="Export an embedder of the first --dim dimensions of a trained model's embedding (optionally "
        "L2-normalised) to ONNX or TorchScript, for images already normalised with the model's mean/std at its "
        "input_size (both recorded in the file's metadata and in a sidecar FILE.json). The file is checked against "
        "the PyTorch model before it is put in place.",
    )
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", required=True,
                   help="a checkpoint, a run folder (runs/NAME/VERSION: its checkpoints/last.ckpt) or a saved model folder")
    p.add_argument("--dim", type=int, required=True,
                   help="how many leading dimensions to output, 1 to the width (best one of the trained sizes)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="onnx or torchscript (default: from --out's suffix, .onnx or .pt/.ts)")
    p.add_argument("--out", required=True, help="the file to write (plus a sidecar FILE.json)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each output row")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the first LAYERS blocks of a transformer backbone (a shallow embedder; "
                        "MatryoshkaModel.truncate)")
    p.add_argument("--batch-size-dynamic", dest="dynamic_batch", action=argparse.BooleanOptionalAction, default=True,
                   help="a dynamic batch axis (default); --no-batch-size-dynamic fixes the batch at 1")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its sidecar)")
    return p


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def load_model(ckpt_path: str | os.PathLike) -> MatryoshkaModel:
    """The model of a checkpoint, run folder or saved model folder, on the CPU in eval mode; one-line
    ``ValueError``/``FileNotFoundError`` when it cannot be read."""
    from .resume import check_checkpoint
    from .runs import find_weights

    weights = find_weights(ckpt_path)
    try:
        return MatryoshkaModel.load(weights, "cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which and why, in one line
        if weights.is_file():
            check_checkpoint(weights)  # raises ValueError naming the file and the reason when unreadable
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"cannot load a model from {str(weights)!r}: {_first_line(e)}") from None


def main(args: Sequence[str]) -> dict[str, Any]:
    """``mrl-vision export``: parse ``args``, export and check; prints one line and returns the
    sidecar's content. Errors come out as one line (``mrl-vision export: error: ...``, exit 1)."""
    from .cli import _user_errors

    a = parser().parse_args(list(args))
    with _user_errors("export", FileExistsError, ImportError, ExportError), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        format = format_of(a.out, a.format)
        if a.opset is not None and format != "onnx":
            raise ValueError("--opset applies to --format onnx only")
        check_outputs(a.out, a.overwrite)  # before the (slow) loading
        if format == "onnx":
            require_onnx()
        model = load_model(a.ckpt_path)
        if a.layers is not None:
            model.truncate(a.layers)
        try:
            info = export_embedder(model, a.out, a.dim, format, a.normalize, a.opset, a.dynamic_batch, a.overwrite,
                                   extra_metadata={"source": str(a.ckpt_path)})
        finally:
            for w in caught:
                if issubclass(w.category, ExportWarning):
                    print(f"mrl-vision export: warning: {w.message}", file=sys.stderr)
    how = f"onnx via the {info['onnx_exporter']} exporter, opset {info['opset']}" if format == "onnx" else "torchscript"
    sizes = info["checked_batch_sizes"]
    batches = f"a batch of {sizes[0]}" if len(sizes) == 1 else "batches of " + " and ".join(map(str, sizes))
    print(f"wrote {a.out} ({how}; dim {info['dim']} of {info['width']}, normalize {'on' if info['normalize'] else 'off'}, "
          f"batch {'dynamic' if info['dynamic_batch'] else 'fixed at 1'}; {_mb(info['file_size'])}) and its sidecar "
          f"{sidecar_path(a.out).name}; check against PyTorch ({info['check_runtime']}, {batches}): "
          f"max abs difference {info['max_abs_diff']:.2g}, tolerance {info['tolerance']:.2g}: OK")
    return info
