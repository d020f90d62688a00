"""``mrl-vision embed`` and the embeddings folder: the real entry point on the quickstart digits and on
small image folders with timm's tiny ``test_resnet``; the reader's checks on damaged folders; 2-process
DDP (CPU, gloo) against 1 process on an odd-sized set (slow)."""

from __future__ import annotations

import json
import shutil
import sys
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import SequentialSampler

from conftest import QUICKSTART_CONFIG, run_console, write_jpeg_tree
from mrl_vision.cli import main
from mrl_vision.data import ImageFolderDataModule
from mrl_vision.data.sampler import UnpaddedDistributedSampler
from mrl_vision.embeddings import FORMAT, load_embeddings, read_embeddings_info
from mrl_vision.model import MatryoshkaModel, weights_fingerprint
from mrl_vision.runs import load_run

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:No seed found"),
]

CLASSES = ("cat", "dog", "fox")
VAL_PER_CLASS = 7  # 21 images: odd, so 2 ranks get 11 and 10


def embed(*args: str) -> dict:
    """``mrl-vision embed ARGS`` through the console entry point; returns the written sidecar."""
    main(["embed", *args])
    return read_embeddings_info(args[args.index("--out") + 1])


def leftovers(folder: Path) -> list[str]:
    """Temporary folders of an embed run left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


@torch.no_grad()
def direct_features(model: MatryoshkaModel, loader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model.features`` over every batch of ``loader``, computed here without a Trainer."""
    model.eval()
    zs, ys = [], []
    for batch in loader:
        x, y = (batch, None) if torch.is_tensor(batch) else (batch[0], batch[1])
        zs.append(model.features(x).clone())
        if y is not None:
            ys.append(y.reshape(-1).long().clone())
    return torch.cat(zs), (torch.cat(ys) if ys else None)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def quick(quickstart_run):
    """A short real `fit` of the quickstart digits: its run folder (config.yaml) and checkpoint."""
    return quickstart_run


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A JPEG tree (3 classes, 2 train and 7 val images each), the val images again as an unlabeled
    predict_dir, a saved 3-class test_resnet (untrained) and a config.yaml giving that data."""
    root = tmp_path_factory.mktemp("folders")
    images = write_jpeg_tree(root / "images", classes=CLASSES, train_per_class=2, val_per_class=VAL_PER_CLASS, seed=3)
    predict = root / "predict"
    predict.mkdir()
    for i, p in enumerate(sorted(images.glob("val/*/*.jpg"))):
        shutil.copy(p, predict / f"img{i:02d}.jpg")
    torch.manual_seed(0)
    model = MatryoshkaModel("test_resnet", num_classes=3, class_names=list(CLASSES), input_size=32)
    saved = model.save_pretrained(root / "saved")
    data = {"root": str(images), "image_size": 32, "eval_crop_ratio": 1.0, "batch_size": 4, "num_workers": 0,
            "predict_dir": str(predict)}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet"},
                                      "data": {"class_path": "mrl_vision.data.ImageFolderDataModule", "init_args": data}}))
    return SimpleNamespace(root=root, images=images, predict=predict, saved=saved, config=config, data=data)


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])  # LightningCLI must not see pytest's arguments


def folder_args(f, *more: str) -> list[str]:
    return ["--ckpt_path", str(f.saved), "--config", str(f.config), "--accelerator", "cpu", *more]


@pytest.fixture(scope="module")
def good(folders, tmp_path_factory) -> Path:
    """A written embeddings folder: the 21 val images in shards of 8, 8 and 5 rows."""
    out = tmp_path_factory.mktemp("good") / "emb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["mrl-vision"])
        embed(*folder_args(folders, "--split", "val", "--out", str(out), "--shard_size", "8"))
    return out


# ----------------------------------------------------------------------------- round trip
def test_embed_round_trip_quickstart(quick, tmp_path, capsys):
    """embed -> load_embeddings differs from model.features over eval_dataloader, the sidecar is wrong, or a
    saved model folder (the data from --config) does not give the same embeddings (float16: within its rounding)."""
    out32, out16 = tmp_path / "emb32", tmp_path / "emb16"
    info = embed("--ckpt_path", str(quick.run), "--split", "test", "--out", str(out32), "--batch_size", "250",
                 "--shard_size", "200", "--accelerator", "cpu")
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("wrote 500 embeddings of width 96 (float32, test split, 3 shards) "
                                                 f"to {out32} in ")
    z, y = load_embeddings(out32)
    model, dm = load_run(quick.run)
    direct, labels = direct_features(model, dm.eval_dataloader("test", batch_size=250))
    assert z.dtype == torch.float32 and z.shape == (500, 96) and y.dtype == torch.int64
    torch.testing.assert_close(z, direct, rtol=0, atol=1e-6)
    assert torch.equal(y, labels) and torch.equal(y, dm.dataset("test").labels)
    # the sidecar
    assert info["format"] == FORMAT and info["version"] == 1
    assert info["model"] == {"backbone": "test_resnet", "layers": None, "head": "mrl", "dims": [8, 16, 32, 64, 96], "width": 96,
                             "num_classes": 10, "class_names": [str(d) for d in range(10)], "ckpt_path": str(quick.run),
                             "fingerprint": weights_fingerprint(model)}
    assert info["sizes"] == [8, 16, 32, 64, 96] and info["count"] == 500 and info["width"] == 96
    assert info["dtype"] == "float32" and info["normalisation"] == "none" and info["labelled"] is True
    assert info["split"] == "test" and info["data"]["split"] == "test" and info["world_size"] == 1
    assert info["data"]["datamodule"].endswith("QuickstartDataModule") and info["data"]["hparams"]["batch_size"] == 16
    assert [(s["rank"], s["rows"]) for s in info["shards"]] == [(0, 200), (0, 200), (0, 100)]
    assert info["shards"][1] == {"rank": 0, "rows": 200, "embeddings": "rank0-00001.embeddings.npy",
                                 "labels": "rank0-00001.labels.npy", "indices": "rank0-00001.indices.npy"}
    assert sorted(p.name for p in out32.iterdir()) == sorted(
        ["embeddings.json"] + [f"rank0-0000{k}.{kind}.npy" for k in range(3) for kind in ("embeddings", "labels", "indices")])
    assert np.load(out32 / "rank0-00001.indices.npy").tolist() == list(range(200, 400))
    assert leftovers(tmp_path) == []
    # a saved model folder as --ckpt_path, the data from --config, stored as float16
    saved = model.save_pretrained(tmp_path / "saved")
    info16 = embed("--ckpt_path", str(saved), "--config", str(QUICKSTART_CONFIG), "--model.backbone", "test_resnet",
                   "--split", "test", "--out", str(out16), "--dtype", "float16", "--batch_size", "250",
                   "--accelerator", "cpu")
    assert info16["dtype"] == "float16" and np.load(out16 / "rank0-00000.embeddings.npy", mmap_mode="r").dtype == np.float16
    assert info16["model"]["ckpt_path"] == str(saved) and len(info16["shards"]) == 1
    assert info16["data"]["hparams"]["batch_size"] == 128  # the quickstart config's, not the run's
    z16, y16 = load_embeddings(out16)
    assert z16.dtype == torch.float32 and torch.equal(y16, y)
    torch.testing.assert_close(z16, direct.half().float(), rtol=0, atol=1e-6)  # float32 rounded to float16
    torch.testing.assert_close(z16, direct, rtol=1e-3, atol=1e-4)


def test_image_folder_predict_dir_is_unlabeled(folders, good, tmp_path):
    """Embeddings of an unlabeled predict_dir have labels, or differ from those of the same images in val."""
    out = tmp_path / "pred"
    info = embed(*folder_args(folders, "--split", "predict", "--out", str(out)))
    assert info["labelled"] is False and info["count"] == 21 and info["shards"][0]["labels"] is None
    assert not list(out.glob("*.labels.npy"))
    z, y = load_embeddings(out)
    assert y is None and z.shape == (21, 96)
    # predict_dir holds the val images in the same order: the same embeddings
    z_val, y_val = load_embeddings(good)
    torch.testing.assert_close(z, z_val, rtol=0, atol=1e-5)
    assert y_val.tolist() == [c for c in range(3) for _ in range(VAL_PER_CLASS)]
    assert read_embeddings_info(good)["data"]["paths"]["val"] == str(folders.images / "val")


# ----------------------------------------------------------------------------- OUT: refusal, overwrite, failures
def test_existing_out_refused_then_overwritten(folders, good, tmp_path):
    """An existing OUT is replaced without --overwrite, or --overwrite leaves the old one or a stray folder."""
    out = tmp_path / "emb"
    shutil.copytree(good, out)
    first = (out / "embeddings.json").read_text()
    with pytest.raises(SystemExit) as e:
        main(["embed", *folder_args(folders, "--split", "predict", "--out", str(out))])
    assert str(e.value) == f"mrl-vision embed: error: {str(out)!r} exists: pass --overwrite to replace it"
    assert (out / "embeddings.json").read_text() == first
    info = embed(*folder_args(folders, "--split", "predict", "--out", str(out), "--overwrite"))
    assert info["split"] == "predict" and not list(out.glob("*.labels.npy")) and len(list(out.iterdir())) == 3
    assert leftovers(tmp_path) == []
    # --overwrite never replaces what is not an embeddings folder
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="is not an embeddings folder"):
        main(["embed", *folder_args(folders, "--split", "val", "--out", str(other), "--overwrite")])
    assert (other / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("args, message", [
    (["--ckpt_path", "missing.ckpt"], "'missing.ckpt' does not exist"),
    (["--split", "validation"], "argument --split: invalid choice: 'validation'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--shard_size", "0"], "argument --shard_size: must be >= 1, got 0"),
])
def test_bad_input_is_one_line(folders, tmp_path, args, message):
    """Bad input is not one `mrl-vision embed: error:` line with exit status 1, or leaves a folder behind."""
    base = {"--ckpt_path": str(folders.saved), "--split": "val", "--out": str(tmp_path / "emb")}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as e:
        main(["embed", *[x for kv in base.items() for x in kv], "--config", str(folders.config)])
    assert str(e.value).startswith("mrl-vision embed: error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and isinstance(e.value.code, str)  # printed to stderr, exit status 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_split_without_data(folders, tmp_path):
    """A split with no data is not refused before any work."""
    root = tmp_path / "only_val"
    shutil.copytree(folders.images / "val", root / "val")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet"}, "data": {
        "class_path": "mrl_vision.data.ImageFolderDataModule",
        "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0}}}))
    with pytest.raises(SystemExit) as e:
        main(["embed", "--ckpt_path", str(folders.saved), "--config", str(config), "--split", "train",
              "--out", str(tmp_path / "emb")])
    assert str(e.value).startswith("mrl-vision embed: error: ") and "train" in str(e.value)
    assert not (tmp_path / "emb").exists() and leftovers(tmp_path) == []


def test_failure_removes_the_temporary_folder(folders, good, tmp_path, monkeypatch):
    """A failure in the data, or an interrupt, leaves a temporary folder, a partial OUT, or harms the old OUT."""
    images = tmp_path / "images"
    shutil.copytree(folders.images, images)
    (images / "val" / "dog" / "dog_3.jpg").write_bytes(b"not a jpeg")  # the 11th image: after a batch was written
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet"}, "data": {
        "class_path": "mrl_vision.data.ImageFolderDataModule", "init_args": {**folders.data, "root": str(images)}}}))
    out = tmp_path / "out" / "emb"
    with pytest.raises(SystemExit) as e:
        main(["embed", "--ckpt_path", str(folders.saved), "--config", str(config), "--split", "val", "--out", str(out),
              "--shard_size", "4", "--accelerator", "cpu"])
    assert "mrl-vision embed: error: cannot read image" in str(e.value) and "dog_3.jpg" in str(e.value)
    assert not out.exists() and leftovers(out.parent) == []
    # an interrupt in the middle with --overwrite: the old folder stays as it was
    shutil.copytree(good, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    features = MatryoshkaModel.features

    def interrupted(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return features(self, x)

    monkeypatch.setattr(MatryoshkaModel, "features", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        main(["embed", *folder_args(folders, "--split", "val", "--out", str(out), "--overwrite", "--shard_size", "4")])
    assert signal.getsignal(signal.SIGINT) == handler  # Lightning's SIG_IGN undone
    assert calls["n"] == 3 and leftovers(out.parent) == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------- the reader's checks
def damaged(good: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "emb"
    shutil.copytree(good, out)
    return out, json.loads((out / "embeddings.json").read_text())


def write_sidecar(out: Path, info: dict) -> None:
    (out / "embeddings.json").write_text(json.dumps(info))


def test_good_folder_reads_back(good):
    """The written folder does not read back in dataset order with its labels."""
    info = read_embeddings_info(good)
    assert [s["rows"] for s in info["shards"]] == [8, 8, 5] and info["count"] == 21
    assert read_embeddings_info(good / "embeddings.json") == info
    z, y = load_embeddings(good)
    assert z.shape == (21, 96) and y.tolist() == [c for c in range(3) for _ in range(VAL_PER_CLASS)]
    assert torch.equal(z[8:16], torch.from_numpy(np.load(good / "rank0-00001.embeddings.npy")))


def test_rows_are_put_in_dataset_order_by_index(good, tmp_path):
    """Rows whose indices are a permutation out of order are not put back in dataset order."""
    out, info = damaged(good, tmp_path)
    for kind in ("embeddings", "labels", "indices"):
        path = out / f"rank0-00001.{kind}.npy"
        np.save(path, np.load(path)[::-1].copy())
    z, y = load_embeddings(out)
    z0, y0 = load_embeddings(good)
    assert torch.equal(z, z0) and torch.equal(y, y0)


def _drop_sidecar(out, info):
    (out / "embeddings.json").unlink()


def _foreign(out, info):
    write_sidecar(out, {**info, "format": "something-else"})


def _missing_shard(out, info):
    (out / "rank0-00001.embeddings.npy").unlink()


def _short_shard(out, info):
    np.save(out / "rank0-00001.embeddings.npy", np.load(out / "rank0-00001.embeddings.npy")[:7])


def _sidecar_width(out, info):
    write_sidecar(out, {**info, "width": 95})


def _sidecar_dtype(out, info):
    write_sidecar(out, {**info, "dtype": "float16"})


def _differing_widths(out, info):
    np.save(out / "rank0-00002.embeddings.npy", np.zeros((5, 64), np.float32))


def _duplicate_index(out, info):
    idx = np.load(out / "rank0-00001.indices.npy")
    idx[0] = 3
    np.save(out / "rank0-00001.indices.npy", idx)


def _index_out_of_range(out, info):
    idx = np.load(out / "rank0-00002.indices.npy")
    idx[-1] = 21
    np.save(out / "rank0-00002.indices.npy", idx)


def _labels_in_some_shards(out, info):
    info["shards"][2]["labels"] = None
    write_sidecar(out, info)


def _count(out, info):
    write_sidecar(out, {**info, "count": 22})


def _empty(out, info):
    write_sidecar(out, {**info, "count": 0, "shards": []})


@pytest.mark.parametrize("damage, error, message", [
    (_drop_sidecar, FileNotFoundError, r"emb/embeddings.json' does not exist"),
    (_foreign, ValueError, r"is not an mrl-vision embeddings sidecar \(format 'something-else'"),
    (_missing_shard, FileNotFoundError, r"shard '.*rank0-00001.embeddings.npy' listed in .* does not exist"),
    (_short_shard, ValueError, r"shard '.*rank0-00001.embeddings.npy' has shape \(7, 96\), but .* lists 8 rows"),
    (_sidecar_width, ValueError, r"rank0-00000.embeddings.npy' has width 96, but .*embeddings.json' says width 95"),
    (_sidecar_dtype, ValueError, r"rank0-00000.embeddings.npy' holds float32, but .* says dtype float16"),
    (_differing_widths, ValueError, r"shards of differing widths .*: rank0-00000.embeddings.npy has 96, "
                                    r"rank0-00002.embeddings.npy has 64"),
    (_duplicate_index, ValueError, r"not a permutation of 0..20: index 3 appears 2 times \(in \['.*rank0-00000.indices.npy', "
                                   r"'.*rank0-00001.indices.npy'\]\)"),
    (_index_out_of_range, ValueError, r"rank0-00002.indices.npy' holds index 21, outside \[0, 21\)"),
    (_labels_in_some_shards, ValueError, r"labels present in some shards only"),
    (_count, ValueError, r"hold 21 rows, but its count is 22"),
    (_empty, ValueError, r"no embeddings \(count 0"),
])
def test_damaged_folder_fails_naming_it(good, tmp_path, damage, error, message):
    """A damaged embeddings folder loads, or fails without naming the file and the disagreement."""
    out, info = damaged(good, tmp_path)
    damage(out, info)
    with pytest.raises(error, match=message):
        load_embeddings(out)


# ----------------------------------------------------------------------------- the data module's loaders
def test_eval_dataloader_predict_and_shard(folders):
    """eval_dataloader('predict') is not what predict reads, or shard=True is not the unpadded strided shard."""
    dm = ImageFolderDataModule(**folders.data)
    x = next(iter(dm.eval_dataloader("predict", batch_size=21)))
    assert torch.is_tensor(x) and x.shape == (21, 3, 32, 32)  # images alone
    assert dm.eval_dataloader("predict").dataset.samples == dm.predict_dataset().samples
    with pytest.raises(ValueError, match="unknown split 'predict'; choose train, val or test"):
        dm.dataset("predict")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert isinstance(dm.eval_dataloader("val").sampler, SequentialSampler)
    sharded = dm.eval_dataloader("val", shard=True)
    assert isinstance(sharded.sampler, UnpaddedDistributedSampler) and list(sharded.sampler) == list(range(1, 21, 2))


# ----------------------------------------------------------------------------- FFCV
@pytest.mark.slow  # FFCV's pipelines compile for several seconds
def test_ffcv_embed_equals_direct(folders, tmp_path):
    """embed of an FFCV split differs from model.features over the FFCV module's eval_dataloader."""
    pytest.importorskip("ffcv")
    from mrl_vision.data import FFCVDataModule

    val = tmp_path / "val.beton"
    main(["prepare", str(folders.images / "val"), str(val), "--num-workers", "1"])
    data = {"val_path": str(val), "image_size": 32, "eval_image_size": 32, "eval_crop_ratio": 1.0,
            "batch_size": 8, "num_workers": 1}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet"},
                                      "data": {"class_path": "mrl_vision.data.FFCVDataModule", "init_args": data}}))
    out = tmp_path / "emb"
    info = embed("--ckpt_path", str(folders.saved), "--config", str(config), "--split", "test", "--out", str(out),
                 "--accelerator", "cpu", "--shard_size", "16")
    assert info["data"]["datamodule"].endswith("FFCVDataModule") and info["data"]["paths"]["test"] == str(val)
    assert [s["rows"] for s in info["shards"]] == [16, 5]
    z, y = load_embeddings(out)
    dm = FFCVDataModule(**data)
    model = MatryoshkaModel.from_pretrained(folders.saved)
    direct, labels = direct_features(model, dm.eval_dataloader("val"))
    torch.testing.assert_close(z, direct, rtol=0, atol=1e-5)
    assert torch.equal(y, labels) and y.tolist() == [c for c in range(3) for _ in range(VAL_PER_CLASS)]


# ----------------------------------------------------------------------------- DDP
def _run(args: list[str], work: Path, name: str, timeout: float = 300) -> str:
    return run_console(args, work, name, timeout)


@pytest.mark.slow
def test_two_process_embed_equals_one_process(folders, good, tmp_path):
    """2-process DDP embed loses, repeats or misorders a sample, or disagrees with 1 process."""
    out = tmp_path / "emb2"
    log = _run(["embed", *folder_args(folders, "--split", "val", "--out", str(out), "--devices", "2",
                                      "--strategy", "ddp", "--shard_size", "4")], tmp_path, "embed2")
    assert f"wrote 21 embeddings of width 96 (float32, val split, 6 shards) to {out}" in log
    info = read_embeddings_info(out)
    assert info["world_size"] == 2 and info["count"] == 21
    assert [(s["rank"], s["rows"]) for s in info["shards"]] == [(0, 4), (0, 4), (0, 3), (1, 4), (1, 4), (1, 2)]
    rank0 = np.concatenate([np.load(out / f"rank0-0000{k}.indices.npy") for k in range(3)])
    rank1 = np.concatenate([np.load(out / f"rank1-0000{k}.indices.npy") for k in range(3)])
    assert rank0.tolist() == list(range(0, 21, 2)) and rank1.tolist() == list(range(1, 21, 2))
    z2, y2 = load_embeddings(out)
    z1, y1 = load_embeddings(good)  # 1 process
    torch.testing.assert_close(z2, z1, rtol=0, atol=1e-5)
    assert torch.equal(y2, y1)
    assert leftovers(tmp_path) == []


def test_embed_after_the_first_blocks_of_a_vit(tmp_path):
    """`embed --layers k` of a ViT stores other embeddings than its k-th block's (layer_features), or records
    a full-depth model."""
    from mrl_vision.data import QuickstartDataModule

    torch.manual_seed(0)
    model = MatryoshkaModel("test_vit", num_classes=10, input_size=32, class_names=[str(d) for d in range(10)])
    saved = model.save_pretrained(tmp_path / "vit")
    info = embed("--ckpt_path", str(saved), "--config", str(QUICKSTART_CONFIG), "--model.backbone", "test_vit",
                 "--split", "val", "--layers", "2", "--out", str(tmp_path / "emb"), "--accelerator", "cpu")
    assert info["model"]["layers"] == 2 and info["width"] == 64
    z, _ = load_embeddings(tmp_path / "emb")
    dm = QuickstartDataModule(batch_size=250, image_size=32)
    dm.setup("validate")
    with torch.no_grad():
        direct = torch.cat([model.eval().layer_features(x, [2])[0] for x, _ in dm.eval_dataloader("val")])
    torch.testing.assert_close(z, direct, rtol=1e-5, atol=1e-5)
