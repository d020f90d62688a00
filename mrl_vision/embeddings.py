"""``mrl-vision embed``: the full-width embeddings of a split on disk, and reading them back.

``mrl-vision embed --ckpt_path CKPT --split test --out runs/emb_test`` runs the backbone once per image
of the split (``model.features(x)``: the pooled full-width embedding, before any head) under the
evaluation transform (no augmentation, whatever the split), through a Lightning Trainer (one process,
or several under DDP), and writes one folder::

    runs/emb_test/
        embeddings.json                     # the sidecar (below)
        rank0-00000.embeddings.npy          # float16 or float32 [rows, width], rows in the rank's order
        rank0-00000.labels.npy              # int64 [rows] (absent for unlabeled data)
        rank0-00000.indices.npy             # int64 [rows]: each row's index in the split (dataset order)
        rank0-00001.embeddings.npy          # a new shard every --shard_size rows (default 65536)
        ...
        rank1-00000.embeddings.npy          # under DDP, every rank writes its own shards
        ...

Under DDP rank ``r`` of ``W`` reads the samples ``r, r + W, r + 2W, ...`` of the split (unpadded
strided shards), so the ``i``-th row of rank ``r`` is sample ``r + W * i``. The sidecar::

    {"format": "mrl-vision-embeddings", "version": 1,
     "model": {"backbone": "resnet18", "head": "mrl", "dims": [8, ..., 512], "width": 512,
               "num_classes": 10, "class_names": ["0", ...], "ckpt_path": "runs/.../last.ckpt",
               "fingerprint": "sha256:..."},   # of the weights (mrl_vision.model.weights_fingerprint)
     "sizes": [8, 16, 32, 64, 128, 256, 512],
     "data": {"datamodule": "mrl_vision.data.quickstart.QuickstartDataModule", "hparams": {...},
              "paths": {...}, "split": "test"},
     "split": "test", "count": 500, "width": 512, "dtype": "float32", "normalisation": "none",
     "labelled": true, "world_size": 1,
     "shards": [{"rank": 0, "rows": 500, "embeddings": "rank0-00000.embeddings.npy",
                 "labels": "rank0-00000.labels.npy", "indices": "rank0-00000.indices.npy"}]}

``normalisation: "none"``: the raw pooled features are stored; a consumer that compares prefixes
(retrieval) normalises each prefix ``z[:, :m]`` after truncation.

The folder appears complete or not at all: everything is written into a hidden temporary folder beside
``OUT`` (``.OUT.<random>.tmp``), renamed to ``OUT`` at the end and removed on any error; an existing
``OUT`` is refused unless ``--overwrite``, and then replaced only once the new folder is complete.

Reading::

    from mrl_vision.embeddings import load_embeddings, read_embeddings_info

    z, labels = load_embeddings("runs/emb_test")   # float32 [N, d] in dataset order, int64 [N] or None
    info = read_embeddings_info("runs/emb_test")   # the sidecar
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .files import atomic_write_text

FORMAT = "mrl-vision-embeddings"
VERSION = 1
SIDECAR = "embeddings.json"
DTYPES = ("float16", "float32")
SPLITS = ("train", "val", "test", "predict")
DEFAULT_SHARD_SIZE = 65536
KINDS = ("embeddings", "labels", "indices")


def shard_files(rank: int, number: int) -> dict[str, str]:
    """The file names of shard ``number`` of ``rank``: ``{"embeddings": "rank0-00000.embeddings.npy", ...}``."""
    stem = f"rank{rank}-{number:05d}"
    return {kind: f"{stem}.{kind}.npy" for kind in KINDS}


# ----------------------------------------------------------------------------- reading
def _sidecar_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" and not p.is_dir() else p / SIDECAR


def read_embeddings_info(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar (``embeddings.json``) of the embeddings folder ``path`` (or the sidecar's own path).

    ``FileNotFoundError`` when it is missing, ``ValueError`` when it is not this format or version or
    lacks a field."""
    sidecar = _sidecar_path(path)
    if not sidecar.is_file():
        raise FileNotFoundError(f"{str(sidecar)!r} does not exist: {str(sidecar.parent)!r} is not an embeddings "
                                "folder (write one with mrl-vision embed)")
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(sidecar)!r} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{str(sidecar)!r} is not an mrl-vision embeddings sidecar (format {found!r}, expected {FORMAT!r})")
    if info.get("version") != VERSION:
        raise ValueError(f"{str(sidecar)!r} has version {info.get('version')!r}; this mrl-vision reads version {VERSION}")
    types = {"count": int, "width": int, "dtype": str, "labelled": bool, "shards": list}
    for key, kind in types.items():
        if not isinstance(info.get(key), kind) or (kind is int and isinstance(info.get(key), bool)):
            raise ValueError(f"{str(sidecar)!r}: {key!r} must be a {kind.__name__}, got {info.get(key)!r}")
    if info["dtype"] not in DTYPES:
        raise ValueError(f"{str(sidecar)!r}: dtype {info['dtype']!r} is not one of {DTYPES}")
    return info


def _open(path: Path, sidecar: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"shard {str(path)!r} listed in {str(sidecar)!r} does not exist")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"cannot read shard {str(path)!r}: {e}") from None


def _shard_arrays(info: dict, sidecar: Path) -> list[dict[str, Any]]:
    """Every listed shard opened (memory-mapped) and checked against the sidecar."""
    folder, dtype, labelled = sidecar.parent, np.dtype(info["dtype"]), info["labelled"]
    shards = []
    for i, entry in enumerate(info["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("rows"), int):
            raise ValueError(f"{str(sidecar)!r}: shard entry {i} is not {{'rows': int, 'embeddings': ..., ...}}: {entry!r}")
        if bool(entry.get("labels")) != labelled:
            raise ValueError(f"{str(sidecar)!r}: labels present in some shards only (labelled is {labelled}, shard "
                             f"{entry.get('embeddings')!r} lists labels {entry.get('labels')!r})")
        arrays: dict[str, Any] = {"rows": entry["rows"]}
        for kind in KINDS:
            name = entry.get(kind)
            if kind == "labels" and not labelled:
                continue
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise ValueError(f"{str(sidecar)!r}: shard entry {i} has no valid {kind} file name: {name!r}")
            path = folder / name
            a = _open(path, sidecar)
            want = (entry["rows"], None) if kind == "embeddings" else (entry["rows"],)
            if a.ndim != len(want) or a.shape[0] != entry["rows"]:
                raise ValueError(f"shard {str(path)!r} has shape {a.shape}, but {str(sidecar)!r} lists {entry['rows']} "
                                 f"rows ({'[rows, width]' if kind == 'embeddings' else '[rows]'} expected)")
            if kind == "embeddings" and a.dtype != dtype:
                raise ValueError(f"shard {str(path)!r} holds {a.dtype}, but {str(sidecar)!r} says dtype {dtype}")
            if kind != "embeddings" and a.dtype.kind not in "iu":
                raise ValueError(f"shard {str(path)!r} holds {a.dtype}; {kind} must be integers")
            arrays[kind], arrays[kind + "_path"] = a, path
        shards.append(arrays)
    return shards


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The embeddings of a folder written by ``mrl-vision embed``: ``(z, labels)``, ``z`` float32
    ``[N, d]`` in dataset order, ``labels`` int64 ``[N]`` or ``None`` for unlabeled data.

    Everything is checked before anything is returned (``FileNotFoundError``/``ValueError`` naming the
    file and the disagreement): the sidecar (present, this format), every listed shard (present, its
    row count, width and dtype those of the sidecar), equal widths, labels in every shard or in none,
    the indices a permutation of ``0..count-1`` (rows are put in dataset order by them), and at least
    one embedding. Shards are memory-mapped and copied once into the returned tensors.

    Example::

        z, y = load_embeddings("runs/emb_test")
        z16 = torch.nn.functional.normalize(z[:, :16], dim=-1)   # a prefix, normalised after truncation
    """
    info = read_embeddings_info(path)
    sidecar = _sidecar_path(path)
    count, width = info["count"], info["width"]
    if count <= 0 or not info["shards"]:
        raise ValueError(f"{str(sidecar)!r}: no embeddings (count {count}, {len(info['shards'])} shards)")
    shards = _shard_arrays(info, sidecar)
    first, found = shards[0]["embeddings_path"], shards[0]["embeddings"].shape[1]
    for s in shards[1:]:
        if s["embeddings"].shape[1] != found:
            raise ValueError(f"shards of differing widths in {str(sidecar.parent)!r}: {first.name} has {found}, "
                             f"{s['embeddings_path'].name} has {s['embeddings'].shape[1]}")
    if found != width:
        raise ValueError(f"shard {str(first)!r} has width {found}, but {str(sidecar)!r} says width {width}")
    total = sum(s["rows"] for s in shards)
    if total != count:
        raise ValueError(f"the shards listed in {str(sidecar)!r} hold {total} rows, but its count is {count}")
    seen = np.zeros(count, dtype=np.int64)
    for s in shards:
        idx = np.asarray(s["indices"], dtype=np.int64)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= count):
            bad = int(idx[(idx < 0) | (idx >= count)][0])
            raise ValueError(f"shard {str(s['indices_path'])!r} holds index {bad}, outside [0, {count}) "
                             f"(count {count} in {str(sidecar)!r})")
        np.add.at(seen, idx, 1)
    if bool((seen != 1).any()):
        dup = np.flatnonzero(seen > 1)
        value = int(dup[0])
        where = [str(s["indices_path"]) for s in shards if bool((np.asarray(s["indices"]) == value).any())]
        raise ValueError(f"the indices of {str(sidecar.parent)!r} are not a permutation of 0..{count - 1}: index "
                         f"{value} appears {int(seen[value])} times (in {where})")
    z = torch.empty((count, width), dtype=torch.float32)
    labels = torch.empty(count, dtype=torch.int64) if info["labelled"] else None
    z_np, y_np = z.numpy(), None if labels is None else labels.numpy()
    for s in shards:
        idx = np.asarray(s["indices"], dtype=np.int64)
        if idx.size and int(idx[-1]) - int(idx[0]) == idx.size - 1 and bool((np.diff(idx) == 1).all()):
            rows = slice(int(idx[0]), int(idx[0]) + idx.size)  # in order: a plain copy from the mapping
        else:
            rows = idx
        z_np[rows] = s["embeddings"]
        if y_np is not None:
            y_np[rows] = s["labels"]
    return z, labels


# ----------------------------------------------------------------------------- writing
def _is_embeddings_folder(path: Path) -> bool:
    try:
        read_embeddings_info(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """``FileExistsError`` naming ``out`` when it exists and may not be replaced: without ``overwrite``,
    or (even with it) when it is something else than an embeddings folder or an empty folder."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{str(out)!r} exists: pass --overwrite to replace it")
    if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not _is_embeddings_folder(out)):
        raise FileExistsError(f"{str(out)!r} exists and is not an embeddings folder (no {SIDECAR}): "
                              "refusing to replace it, even with --overwrite")


def _replace_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (with ``overwrite``) is removed only afterwards."""
    old = None
    if out.exists() or out.is_symlink():
        check_out(out, overwrite)
        old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` of a batch: ``(images, labels, ...)``, or images alone (labels ``None``)."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        labels = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], labels
    raise TypeError(f"a batch must be images [N, 3, H, W] or (images, labels, ...), got {type(batch).__name__}")


class Embedder(L.LightningModule):
    """``model.features`` (the pooled full-width embedding) over the evaluation loader of one split of
    a data module, for ``Trainer.predict``: ``predict_step`` returns ``{"embeddings": [N, d],
    "labels": [N]}`` (no ``labels`` for batches of images alone). The loader is the data module's
    ``eval_dataloader(split, shard=True)`` (unpadded strided shards under DDP), and the batch
    transfer hooks are the data module's (label check, FFCV's normalisation on the device).
    Give the data module the trainer (``datamodule.trainer = trainer``) before predicting."""

    def __init__(self, model: torch.nn.Module, datamodule: L.LightningDataModule, split: str,
                 batch_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.data, self.split, self.batch_size = datamodule, split, batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = _split_batch(batch)
        out = {"embeddings": self.model.features(images)}
        if labels is not None:
            out["labels"] = labels
        return out

    def predict_dataloader(self):
        return self.data.eval_dataloader(self.split, batch_size=self.batch_size, shard=True)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.data.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.data.on_after_batch_transfer(batch, dataloader_idx)


class EmbeddingWriter(BasePredictionWriter):
    """Writes the predictions of :class:`Embedder` as an embeddings folder ``out`` (see the module).

    Rank 0 creates the temporary folder ``.OUT.<random>.tmp`` beside ``out`` and broadcasts its name;
    every rank appends its rows (in its loader's order) to ``.npy`` shards of ``shard_size`` rows
    there; at the end, after a barrier, rank 0 checks that rank ``r`` of ``W`` wrote exactly the
    samples ``r, r + W, ...`` of ``expected_count`` (when given), writes the sidecar (``meta`` plus
    what was written) and renames the folder to ``out``. On an exception the temporary folder is removed.
    ``info`` is the sidecar, on rank 0, once done.
    """

    def __init__(self, out: str | os.PathLike, dtype: str = "float32", shard_size: int = DEFAULT_SHARD_SIZE,
                 overwrite: bool = False, expected_count: int | None = None, meta: dict | None = None) -> None:
        super().__init__(write_interval="batch")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out, self.dtype, self.shard_size, self.overwrite = Path(out), dtype, shard_size, overwrite
        self.expected_count, self.meta = expected_count, dict(meta or {})
        self.tmp: Path | None = None
        self.info: dict | None = None
        self.finished = False  # this rank's part is done: its temporary folder must not be removed

    # -------------------------------------------------------------- the temporary folder
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank, self.world = trainer.global_rank, trainer.world_size
        # one shard's rows are gathered here, then saved: memory stays at one shard (+ one batch) per process
        self._z: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._fill = self._written = self._number = 0
        self._labelled: bool | None = None
        self.finished, self.info = False, None
        name: str | None = None
        if trainer.is_global_zero:
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give OUT the usual permissions
                name = str(self.tmp)
            except OSError as e:
                name = "error: " + str(e)
        name = trainer.strategy.broadcast(name, src=0)  # one folder for every rank
        if name is None or name.startswith("error: "):
            raise OSError(f"cannot create a temporary folder beside {str(self.out)!r}: {name[7:] if name else 'unknown'}")
        self.tmp = Path(name)
        if not self.tmp.is_dir():
            raise FileNotFoundError(f"rank {self.rank}: the temporary folder {name!r} made by rank 0 is not visible "
                                    "here (writing embeddings under DDP needs a file system every node shares)")

    def cleanup(self) -> None:
        """Remove the temporary folder unless this rank's part is done."""
        if self.tmp is not None and not self.finished and self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.cleanup()

    # -------------------------------------------------------------- the shards
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        z = prediction["embeddings"].detach()
        if z.ndim != 2:
            raise ValueError(f"embeddings must be [N, d], got shape {tuple(z.shape)}")
        z = z.to(device="cpu", dtype=getattr(torch, self.dtype)).numpy()
        y = prediction.get("labels")
        if y is not None:
            y = y.detach().reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
            if len(y) != len(z):
                raise ValueError(f"a batch of {len(z)} embeddings has {len(y)} labels")
        if self._labelled is None:
            self._labelled = y is not None
        elif self._labelled != (y is not None):
            raise ValueError("some batches have labels and others not")
        if self._z is None:  # np.empty: pages are only touched as rows arrive
            self._z = np.empty((self.shard_size, z.shape[1]), dtype=z.dtype)
            self._y = np.empty(self.shard_size, dtype=np.int64) if y is not None else None
        if z.shape[1] != self._z.shape[1]:
            raise ValueError(f"a batch of embeddings of width {z.shape[1]} after width {self._z.shape[1]}")
        done = 0
        while done < len(z):
            take = min(self.shard_size - self._fill, len(z) - done)
            self._z[self._fill:self._fill + take] = z[done:done + take]
            if self._y is not None:
                self._y[self._fill:self._fill + take] = y[done:done + take]
            self._fill += take
            done += take
            if self._fill == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        """Save the gathered rows as this rank's next shard; the i-th row of rank r is sample r + W * i."""
        assert self.tmp is not None and self._z is not None
        n, files = self._fill, shard_files(self.rank, self._number)
        np.save(self.tmp / files["embeddings"], self._z[:n])
        rows = np.arange(self._written, self._written + n, dtype=np.int64)
        np.save(self.tmp / files["indices"], self.rank + self.world * rows)
        if self._y is not None:
            np.save(self.tmp / files["labels"], self._y[:n])
        self._written += n
        self._number += 1
        self._fill = 0

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fill:
            self._flush()
        self._z = self._y = None
        trainer.strategy.barrier("mrl_vision_embeddings_written")
        if not trainer.is_global_zero:
            self.finished = True  # rank 0 now owns the folder
            return
        self.info = self._sidecar()
        atomic_write_text(self.tmp / SIDECAR, json.dumps(self.info, indent=2) + "\n")
        _replace_folder(self.tmp, self.out, self.overwrite)
        self.finished = True

    def _sidecar(self) -> dict[str, Any]:
        """The shards every rank wrote (read from their headers), checked, as the sidecar."""
        assert self.tmp is not None
        shards, rows_by_rank, widths = [], [], set()
        for rank in range(self.world):
            rows_by_rank.append(0)
            number = 0
            while (self.tmp / shard_files(rank, number)["embeddings"]).is_file():
                files = shard_files(rank, number)
                z = np.load(self.tmp / files["embeddings"], mmap_mode="r")
                labelled = (self.tmp / files["labels"]).is_file()
                shards.append({"rank": rank, "rows": int(z.shape[0]), "embeddings": files["embeddings"],
                               "labels": files["labels"] if labelled else None, "indices": files["indices"]})
                widths.add(int(z.shape[1]))
                rows_by_rank[rank] += int(z.shape[0])
                number += 1
        count = sum(rows_by_rank)
        split = f"the {self.meta['split']} split" if self.meta.get("split") else "the data"
        if count == 0:
            raise ValueError(f"no embeddings: {split} gave no images")
        n = self.expected_count
        if n is not None:
            expected = [len(range(rank, n, self.world)) for rank in range(self.world)]
            if rows_by_rank != expected:
                raise RuntimeError(f"the ranks wrote {rows_by_rank} rows, expected {expected} (the {n} samples of "
                                   f"{split} in strided shards over {self.world} processes)")
        labelled = {s["labels"] is not None for s in shards}
        if len(labelled) > 1:
            raise RuntimeError("some ranks wrote labels and others not")
        if len(widths) > 1:
            raise RuntimeError(f"the ranks wrote embeddings of differing widths {sorted(widths)}")
        meta = dict(self.meta)
        return {"format": FORMAT, "version": VERSION, **meta, "count": count, "width": widths.pop(),
                "dtype": self.dtype, "normalisation": "none", "labelled": labelled.pop(),
                "world_size": self.world, "shards": shards}


# ----------------------------------------------------------------------------- the command
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def data_source(datamodule: Any, split: str) -> dict[str, Any]:
    """What the sidecar records of the data: the module's class, its hyperparameters, its files and the split."""
    cls = type(datamodule)
    source: dict[str, Any] = {"datamodule": f"{cls.__module__}.{cls.__qualname__}",
                              "hparams": _jsonable({k: v for k, v in dict(getattr(datamodule, "hparams", None) or {}).items()
                                                    if not str(k).startswith("_")})}
    paths = getattr(datamodule, "paths", None)  # FFCV: the file of each split
    if not isinstance(paths, dict):
        paths = getattr(datamodule, "split_dirs", None)  # image folders: the folder of each split
    if isinstance(paths, dict):
        source["paths"] = {k: None if v is None else str(v) for k, v in paths.items()}
    source["split"] = split
    return source


def split_size(datamodule: Any, split: str) -> int | None:
    """How many samples ``split`` of ``datamodule`` holds (``predict``: what ``predict_dataloader``
    reads), or None where the module cannot tell; ``ValueError``/``FileNotFoundError`` when the split
    has no data."""
    try:
        return datamodule.num_samples(split)
    except TypeError:  # a module with its own loaders and no map-style dataset
        return None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _devices(value: str) -> int | str:
    return value if value == "auto" else _positive(value)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line ``mrl-vision embed: error: ...`` and exit status 1."""

    def error(self, message: str):  # type: ignore[override]
        raise SystemExit(f"{self.prog}: error: {message}")


def embed_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mrl-vision embed", description="Write the full-width embeddings (the backbone's pooled "
        "features, evaluation transform), labels and sample indices of one split as .npy shards plus a JSON "
        "sidecar (embeddings.json) into OUT, with the data of the run that trained the checkpoint (its "
        "config.yaml) unless other arguments (--config, --data.*) choose the data as for fit. Under DDP "
        "(--devices N --strategy ddp) every process writes its own shards.")
    p.add_argument("--ckpt_path", required=True, help="a checkpoint, a run folder or a saved model folder")
    p.add_argument("--split", required=True, choices=SPLITS, help="the split to embed (predict: what predict reads)")
    p.add_argument("--out", required=True, help="the folder to write (refused when it exists, unless --overwrite)")
    p.add_argument("--layers", type=int, default=None,
                   help="embed after the first LAYERS blocks of a transformer backbone (MatryoshkaModel.truncate)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored dtype of the embeddings (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new folder is complete)")
    p.add_argument("--batch_size", type=_positive, default=None, help="images per batch and device (default: the data's)")
    p.add_argument("--shard_size", type=_positive, default=DEFAULT_SHARD_SIZE,
                   help=f"rows per .npy shard (default {DEFAULT_SHARD_SIZE}): bounds the memory held per process")
    p.add_argument("--accelerator", default="auto", choices=["cpu", "gpu", "auto"], help="default auto")
    p.add_argument("--devices", type=_devices, default=1, help="processes/devices (default 1)")
    p.add_argument("--num_nodes", type=_positive, default=1, help="nodes (default 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default auto)")
    return p


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's informational lines (devices, DDP set-up) and its loader-worker hint, off."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
            warnings.filterwarnings("ignore", message=".*infer the batch indices.*")  # FFCV: the writer counts rows
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def main(args: Sequence[str]) -> dict | None:
    """``mrl-vision embed``: parse ``args`` (unknown ones choose the data, as for ``truncate``), write
    the embeddings folder and print one line; returns its sidecar (``None`` on ranks other than 0).
    Bad input fails before any work with one line and exit status 1."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from .cli import _user_errors
    from .model import weights_fingerprint
    from .runs import find_weights, load_run

    a, rest = embed_parser().parse_known_args(list(args))
    start = time.time()
    with _user_errors("embed", FileExistsError, MisconfigurationException), _quiet():
        check_out(a.out, a.overwrite)
        find_weights(a.ckpt_path)  # a missing checkpoint fails before the data is built
        model, dm = load_run(a.ckpt_path, rest)
        if a.layers is not None:
            model.truncate(a.layers)
        if not hasattr(dm, "eval_dataloader"):
            raise ValueError(f"{type(dm).__name__} is not a MatryoshkaDataModule (it needs eval_dataloader(split))")
        count = split_size(dm, a.split)
        if count == 0:
            raise ValueError(f"the {a.split} split holds no images")
        meta = {
            "model": {"backbone": model.backbone_name, "layers": model.config["layers"], "head": model.head_kind,
                      "dims": list(model.dims),
                      "width": model.width, "num_classes": model.num_classes,
                      "class_names": list(model.class_names or dm.class_names), "ckpt_path": str(a.ckpt_path),
                      "fingerprint": weights_fingerprint(model)},
            "sizes": list(model.dims),
            "data": data_source(dm, a.split),
            "split": a.split,
        }
        if getattr(dm, "open_set", False):  # the split's labels name classes of its own (unseen in training)
            meta["label_names"] = list(dm.split_class_names(a.split))
        writer = EmbeddingWriter(a.out, a.dtype, a.shard_size, a.overwrite, count, meta)
        trainer = L.Trainer(
            accelerator=a.accelerator, devices=a.devices, num_nodes=a.num_nodes, strategy=a.strategy,
            precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, callbacks=[writer],
        )
    dm.trainer = trainer  # the data module sees the world size (sharded evaluation loaders)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with _user_errors("embed", FileExistsError), _quiet():
            trainer.predict(Embedder(model, dm, a.split, a.batch_size), return_predictions=False)
    finally:
        writer.cleanup()  # after an error or an interrupt; a finished folder stays
        if sigint is not None:  # Lightning ignores SIGINT after an interrupt; give it back
            with contextlib.suppress(ValueError):  # (not the main thread)
                signal.signal(signal.SIGINT, sigint)
    if writer.info is None:
        return None
    info = writer.info
    print(f"wrote {info['count']} embeddings of width {info['width']} ({info['dtype']}, {a.split} split"
          f"{'' if info['labelled'] else ', unlabeled'}, {len(info['shards'])} shard{'s' * (len(info['shards']) != 1)}) "
          f"to {a.out} in {time.time() - start:.1f} s")
    sys.stdout.flush()
    return info
