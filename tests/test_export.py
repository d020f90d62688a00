"""``mrl-vision export``: ONNX and TorchScript embedders of the first m dims, checked against PyTorch.

timm's tiny ``test_resnet`` (width 96, dims 8..96) at 32 px keeps every export within a few seconds;
the ONNX exports (the slow part) are shared by module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import TEST_RESNET_DIMS, TEST_RESNET_WIDTH
from mrl_vision import export
from mrl_vision.cli import main
from mrl_vision.export import MatryoshkaEmbedder, export_embedder
from mrl_vision.model import MatryoshkaModel

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
SIZE = 32


def _model(num_classes: int | None = 3) -> MatryoshkaModel:
    torch.manual_seed(0)
    return MatryoshkaModel(backbone="test_resnet", num_classes=num_classes, input_size=SIZE, mean=MEAN, std=STD).eval()


def _images(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _run_cli(args: list[str]) -> str:
    """``mrl-vision export ARGS`` through the real entry point; its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["export", *args])
    return out.getvalue()


def _onnx_embed(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return session.run(None, {"images": x.numpy()})[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine, two threads waiting on each other make these
    tiny convolutions 10x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[MatryoshkaModel, Path]:
    """A classifier (3 classes) saved with save_pretrained, and the model itself."""
    model = _model()
    return model, model.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture(scope="module")
def onnx_export(saved, tmp_path_factory) -> tuple[Path, str]:
    """``export --dim 16 --format onnx`` of the saved classifier: (the file, what the command printed)."""
    out = tmp_path_factory.mktemp("onnx") / "emb16.onnx"
    printed = _run_cli(["--ckpt_path", str(saved[1]), "--dim", "16", "--format", "onnx", "--out", str(out)])
    return out, printed


# ----------------------------------------------------------------------------- ONNX
def test_onnx_equals_embed_at_any_batch_size(saved, onnx_export):
    model, _ = saved
    path, printed = onnx_export
    for n in (2, 5):  # the export's batch size, and another: the batch axis is dynamic
        x = _images(n, seed=n)
        got = _onnx_embed(path, x)
        assert got.shape == (n, 16)
        np.testing.assert_allclose(got, model.embed(x, 16).numpy(), atol=1e-4, rtol=0)
    assert printed.count("\n") == 1, printed
    assert "onnx" in printed and "dim 16 of 96" in printed and "normalize off" in printed
    assert "max abs difference" in printed and "OK" in printed
    assert _leftovers(path.parent) == []


def test_onnx_metadata_in_file_and_sidecar(saved, onnx_export):
    model, folder = saved
    path, _ = onnx_export
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    expected = {"dim": 16, "normalize": False, "backbone": "test_resnet", "dims": TEST_RESNET_DIMS,
                "width": TEST_RESNET_WIDTH, "input_size": SIZE, "mean": MEAN, "std": STD, "format": "onnx"}
    for key, value in expected.items():
        assert props[key] == value, key
        assert sidecar[key] == value, key
    assert props["onnx_exporter"] == sidecar["onnx_exporter"] in ("dynamo", "legacy")
    assert sidecar["max_abs_diff"] <= sidecar["tolerance"]
    assert sidecar["checked_batch_sizes"] == [2, 3]
    assert sidecar["file_size"] == path.stat().st_size
    assert sidecar["source"] == str(folder)
    # ONNX Runtime exposes the same facts to a user of the file
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["dim"]) == 16


def test_onnx_normalized_pure_embedder(tmp_path):
    model = _model(num_classes=None)  # no classifier head
    folder = model.save_pretrained(tmp_path / "embedder")
    out = tmp_path / "unit.onnx"
    printed = _run_cli(["--ckpt_path", str(folder), "--dim", "16", "--normalize", "--out", str(out)])  # format from suffix
    assert "normalize on" in printed
    x = _images(4)
    got = _onnx_embed(out, x)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, model.embed(x, 16, normalize=True).numpy(), atol=1e-4, rtol=0)
    assert json.loads(out.with_name("unit.onnx.json").read_text())["head"] is None


def test_legacy_exporter_when_dynamo_fails(saved, tmp_path, monkeypatch, capsys):
    original = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return original(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model, folder = saved
    out = tmp_path / "legacy.onnx"
    main(["export", "--ckpt_path", str(folder), "--dim", "8", "--out", str(out)])
    captured = capsys.readouterr()
    assert "simulated dynamo failure" in captured.err and "legacy" in captured.out
    x = _images(4)
    np.testing.assert_allclose(_onnx_embed(out, x), model.embed(x, 8).numpy(), atol=1e-4, rtol=0)
    assert json.loads(out.with_name("legacy.onnx.json").read_text())["onnx_exporter"] == "legacy"


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("normalize", [False, True])
def test_torchscript_equals_embed(saved, tmp_path, normalize):
    model, folder = saved
    out = tmp_path / "emb16.pt"
    printed = _run_cli(["--ckpt_path", str(folder), "--dim", "16", "--format", "torchscript", "--out", str(out)]
                       + (["--normalize"] if normalize else []))
    assert "torchscript" in printed and f"normalize {'on' if normalize else 'off'}" in printed
    extra = {"mrl_vision.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    for n in (2, 5):
        x = _images(n, seed=n)
        with torch.no_grad():
            got = module(x)
        assert got.shape == (n, 16)
        torch.testing.assert_close(got, model.embed(x, 16, normalize=normalize), atol=1e-4, rtol=0)
        if normalize:
            torch.testing.assert_close(got.norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    meta, sidecar = json.loads(extra["mrl_vision.json"]), json.loads((tmp_path / "emb16.pt.json").read_text())
    for key, value in {"dim": 16, "normalize": normalize, "backbone": "test_resnet", "dims": TEST_RESNET_DIMS,
                       "input_size": SIZE, "mean": MEAN, "std": STD, "format": "torchscript"}.items():
        assert meta[key] == value and sidecar[key] == value, key
    assert sidecar["max_abs_diff"] <= sidecar["tolerance"]


def test_checkpoint_of_a_fit_as_ckpt_path(tmp_path, quickstart_run):
    fit = SimpleNamespace(checkpoint=quickstart_run.ckpt)
    out = tmp_path / "from_ckpt.pt"
    _run_cli(["--ckpt_path", str(fit.checkpoint), "--dim", "8", "--format", "torchscript", "--out", str(out)])
    model = MatryoshkaModel.from_checkpoint(fit.checkpoint)
    x = torch.randn(3, 3, model.input_size, model.input_size)
    torch.testing.assert_close(torch.jit.load(str(out))(x), model.embed(x, 8), atol=1e-4, rtol=0)
    sidecar = json.loads((tmp_path / "from_ckpt.pt.json").read_text())
    assert (sidecar["input_size"], sidecar["mean"], sidecar["std"]) == (model.input_size, model.mean, model.std)
    assert sidecar["mean"] is not None


def test_untrained_dim_is_exported_with_a_warning(saved, tmp_path, capsys):
    model, folder = saved
    out = tmp_path / "emb20.pt"
    main(["export", "--ckpt_path", str(folder), "--dim", "20", "--out", str(out)])
    err = capsys.readouterr().err
    assert "warning" in err and "dim 20" in err and str(TEST_RESNET_DIMS) in err
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(x), model.features(x)[:, :20], atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "emb20.pt.json").read_text())["trained_dim"] is False


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("dim", [0, TEST_RESNET_WIDTH + 1])
def test_dim_out_of_range_is_refused_naming_it(saved, tmp_path, dim):
    out = tmp_path / "e.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(saved[1]), "--dim", str(dim), "--out", str(out)])
    message = str(e.value.code)
    assert message.startswith("mrl-vision export: error: ") and f"--dim {dim}" in message and "96" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_existing_out_is_refused_and_untouched(saved, tmp_path):
    out = tmp_path / "e.pt"
    out.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(saved[1]), "--dim", "16", "--out", str(out)])
    assert "already exists" in str(e.value.code) and "--overwrite" in str(e.value.code)
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.pt"]
    _run_cli(["--ckpt_path", str(saved[1]), "--dim", "16", "--out", str(out), "--overwrite"])
    assert out.read_text(errors="replace") != "keep me" and (tmp_path / "e.pt.json").is_file()


def test_failed_check_leaves_nothing(saved, tmp_path, monkeypatch):
    """A file that does not match the model is never put in place (here: a tolerance nothing meets)."""
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    out = tmp_path / "e.pt"
    out.write_text("old")
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(saved[1]), "--dim", "16", "--out", str(out), "--overwrite"])
    assert str(e.value.code).startswith("mrl-vision export: error: the exported file differs")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.pt"]  # no sidecar, no temporary file


def test_missing_onnx_runtime_names_the_extra(saved, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(saved[1]), "--dim", "16", "--out", str(tmp_path / "e.onnx")])
    assert 'pip install "mrl-vision[export]"' in str(e.value.code)
    assert list(tmp_path.iterdir()) == []


def test_bad_ckpt_path_and_opset_are_one_line_errors(saved, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(tmp_path / "nope"), "--dim", "16", "--out", str(tmp_path / "e.pt")])
    assert str(e.value.code).startswith("mrl-vision export: error: ") and "does not exist" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(saved[1]), "--dim", "16", "--opset", "17", "--out", str(tmp_path / "e.pt")])
    assert "--opset applies to --format onnx only" in str(e.value.code)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Python API
def test_embedder_module_and_export_embedder(tmp_path):
    model = _model()
    model.train()
    embedder = MatryoshkaEmbedder(model, 32, normalize=True)
    assert not embedder.training
    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(embedder(x), model.embed(x, 32, normalize=True))
    assert embedder(x).shape == (3, 32)
    with pytest.raises(ValueError, match="--dim 0"):
        MatryoshkaEmbedder(model, 0)
    model.train()
    info = export_embedder(model, tmp_path / "e.pt", 8, format="torchscript", dynamic_batch=False)
    assert model.training  # left in the mode it was in
    assert info["dim"] == 8 and info["checked_batch_sizes"] == [1] and info["input"]["shape"][0] == 1
    assert 0 <= info["max_abs_diff"] <= info["tolerance"]
    with pytest.raises(FileExistsError):
        export_embedder(model, tmp_path / "e.pt", 8, format="torchscript")


def test_torchscript_of_the_first_blocks_of_a_vit(tmp_path):
    """`export --layers k` of a ViT computes other than its k-th block's embedding, or records full depth."""
    torch.manual_seed(0)
    model = MatryoshkaModel("test_vit", num_classes=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3).eval()
    folder = model.save_pretrained(tmp_path / "vit")
    out = tmp_path / "shallow.pt"
    _run_cli(["--ckpt_path", str(folder), "--dim", "32", "--layers", "2", "--format", "torchscript", "--out", str(out)])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.layer_features(x, [2])[0][:, :32]
    torch.testing.assert_close(torch.jit.load(str(out))(x), expected, atol=1e-4, rtol=0)
    assert json.loads(out.with_name(out.name + ".json").read_text())["layers"] == 2
