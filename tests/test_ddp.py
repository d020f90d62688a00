"""Multi-process DDP through the real console entry point (CPU, gloo, 2 processes).

- ``test`` with 2 processes gives exactly the per-size accuracies of 1 process, for the ImageFolder,
  FFCV and litdata streaming data modules, on an odd-sized set (21 images: shards of 11 and 10, partial batches),
  and both equal the accuracies computed here directly from the checkpoint over every image once.
- ``fit`` with 2 processes shards the training set (ImageFolder through Lightning's sampler, FFCV
  through ``distributed=True``): half the steps of one process.
- ``fit`` with 2 processes for a few steps, then ``fit --ckpt_path last`` (a new version folder),
  resumes from the first run's ``last.ckpt`` and continues its epoch and step count.

Each run is a subprocess (``python -m mrl_vision.cli``) killed with its whole process group when it
overruns, so a hung rank fails the test instead of hanging the suite.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import QUICKSTART_CONFIG, run_console, write_jpeg_tree
from mrl_vision import MatryoshkaClassifier, MatryoshkaModel
from mrl_vision.data import ImageFolderDataModule

pytestmark = pytest.mark.slow

CLASSES = ("cat", "dog", "fox")
EVAL_PER_CLASS = 7  # 21 evaluation images: odd, so 2 ranks get 11 and 10


def _run(args: list[str], work: Path, name: str, timeout: float = 300) -> str:
    return run_console(args, work, name, timeout)


def _in_process(args: list[str], work: Path) -> None:
    """The same CLI run with one process, in this one (no interpreter start-up: the suite's time)."""
    from mrl_vision.cli import cli

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(sys, "argv", ["mrl-vision"])
        for key in ("MASTER_PORT", "MASTER_ADDR", "MRL_VISION_RESUME_FROM"):
            mp.delenv(key, raising=False)
        cli(args)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _trainer_args(devices: int, save_dir: Path) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"]


# ----------------------------------------------------------------------------- validate / test
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """An odd-sized JPEG tree, the same images as a .beton, and a briefly trained 3-class checkpoint."""
    root = tmp_path_factory.mktemp("ddp_eval")
    images = write_jpeg_tree(root / "images", classes=CLASSES, train_per_class=4, val_per_class=EVAL_PER_CLASS, seed=3)
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(images), image_size=32, batch_size=4, num_workers=0)
    model = MatryoshkaClassifier(num_classes=3, backbone="test_resnet", lr=0.05, lr_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    beton = None
    try:
        from mrl_vision.data.beton import write_beton

        beton = root / "val.beton"
        write_beton(str(images / "val"), beton, write_mode="raw", num_workers=1)
        write_beton(str(images / "train"), root / "train.beton", write_mode="jpg", num_workers=1)
    except ImportError:
        pass
    lit = None
    try:
        from mrl_vision.data.chunks import write_chunks

        lit = root / "lit"
        write_chunks(str(images / "val"), lit / "val", num_workers=1)
        write_chunks(str(images / "train"), lit / "train", num_workers=1)
    except ImportError:
        pass
    return {"root": root, "images": images, "ckpt": ckpt, "beton": beton, "lit": lit}


def _data_config(kind: str, setup: dict, batch_size: int = 4) -> dict:
    if kind == "imagefolder":
        return {"class_path": "mrl_vision.data.ImageFolderDataModule",
                "init_args": {"root": str(setup["images"]), "image_size": 32, "eval_crop_ratio": 1.0,
                              "batch_size": batch_size, "num_workers": 0}}
    if kind == "streaming":
        if setup["lit"] is None:
            pytest.skip("litdata is not installed")
        return {"class_path": "mrl_vision.data.StreamingDataModule",
                "init_args": {"train_path": str(setup["lit"] / "train"), "val_path": str(setup["lit"] / "val"),
                              "image_size": 32, "eval_image_size": 32, "eval_crop_ratio": 1.0,
                              "batch_size": batch_size, "num_workers": 1}}
    if setup["beton"] is None:
        pytest.skip("ffcv is not installed")
    return {"class_path": "mrl_vision.data.FFCVDataModule",
            "init_args": {"train_path": str(setup["root"] / "train.beton"), "val_path": str(setup["beton"]),
                          "test_path": str(setup["beton"]), "image_size": 32, "eval_image_size": 32,
                          "eval_crop_ratio": 1.0, "batch_size": batch_size, "num_workers": 1}}


def _write_config(work: Path, kind: str, setup: dict, batch_size: int = 4) -> None:
    work.mkdir()
    cfg = {
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": "runs", "name": "t"}}},
        "model": {"backbone": "test_resnet"},
        "data": _data_config(kind, setup, batch_size),
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))


def _test_run(kind: str, setup: dict, devices: int) -> Path:
    """``mrl-vision test`` of the fixed checkpoint with ``devices`` processes; returns the log dir."""
    work = setup["root"] / f"{kind}_{devices}"
    _write_config(work, kind, setup)
    args = ["test", "--config", "config.yaml", "--ckpt_path", str(setup["ckpt"]), *_trainer_args(devices, work / "runs")]
    if devices == 1:
        _in_process(args, work)
    else:
        _run(args, work, "test")
    return work / "runs" / "t" / "version_0"


def _direct_accuracy(setup: dict) -> dict[int, float]:
    """Per-size top-1 of the checkpoint over every evaluation image exactly once, in one process."""
    model = MatryoshkaModel.from_checkpoint(setup["ckpt"])  # the network alone, in eval mode
    assert not model.training
    dm = ImageFolderDataModule(str(setup["images"]), image_size=32, eval_crop_ratio=1.0, batch_size=64, num_workers=0)
    dm.setup("test")
    logits, labels = [], []
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            logits.append(model(x))
            labels.append(y)
    logits, labels = torch.cat(logits, 1), torch.cat(labels)
    assert labels.numel() == len(CLASSES) * EVAL_PER_CLASS
    return {m: (logits[g].argmax(-1) == labels).float().mean().item() for g, m in enumerate(model.dims)}


def _per_size(log_dir: Path) -> dict[int, float]:
    rows = _read_csv(log_dir / "test_accuracy.csv")
    return {int(r["dims"]): float(r["top1"]) for r in rows}


@pytest.mark.parametrize("kind", ["imagefolder", "ffcv", "streaming"])
def test_two_process_test_equals_one_process(kind, eval_setup):
    """2-process `test` counts a padded duplicate, drops a sample, or disagrees with 1 process."""
    one = _test_run(kind, eval_setup, 1)
    two = _test_run(kind, eval_setup, 2)
    acc1, acc2 = _per_size(one), _per_size(two)
    assert list(acc1) == [8, 16, 32, 64, 96]
    assert acc2 == acc1
    logged1 = {k: float(v) for r in _read_csv(one / "metrics.csv") for k, v in r.items() if k.startswith("test/top") and v}
    logged2 = {k: float(v) for r in _read_csv(two / "metrics.csv") for k, v in r.items() if k.startswith("test/top") and v}
    assert logged1 and logged2 == pytest.approx(logged1, abs=1e-7)
    if kind in ("imagefolder", "streaming"):  # FFCV decodes through its own resize: compare it with 1 process only
        direct = _direct_accuracy(eval_setup)
        assert acc1 == pytest.approx({m: 100 * v for m, v in direct.items()}, abs=1e-4)


@pytest.mark.parametrize("kind", ["imagefolder", "ffcv"])
def test_two_process_fit_shards_training(kind, eval_setup):
    """2-process `fit` does not shard the training set (each rank would take every batch) or fails."""
    work = eval_setup["root"] / f"fit_{kind}"
    _write_config(work, kind, eval_setup, batch_size=2)
    _run(["fit", "--config", "config.yaml", "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
          *_trainer_args(2, work / "runs")], work, "fit")
    # 12 training images, 2 ranks, batch 2 per rank: 3 steps (6 without sharding), drop_last on both modules
    ckpts = sorted(p.name for p in (work / "runs" / "t" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["epoch=0-step=3.ckpt"]
    rows = _read_csv(work / "runs" / "t" / "version_0" / "metrics.csv")
    assert any(r.get("val/top1@96") for r in rows)  # validation ran on both ranks and was logged


# ----------------------------------------------------------------------------- fit + resume
def test_two_process_fit_then_resume_from_last(tmp_path):
    """`fit --ckpt_path last` under DDP starts over, or loses the epoch/step count of the first run."""
    common = ["--config", str(QUICKSTART_CONFIG), "--model.backbone", "test_resnet",
              "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
              "--trainer.num_sanity_val_steps", "0", *_trainer_args(2, tmp_path / "runs")]
    _run(["fit", *common, "--trainer.max_epochs", "1"], tmp_path, "fit1")
    first = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints"
    assert (first / "last.ckpt").is_file() and (first / "epoch=0-step=3.ckpt").is_file()
    out = _run(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"], tmp_path, "fit2")
    assert f"resuming from {first / 'last.ckpt'}" in out
    assert "Restored all states from the checkpoint" in out or "Restoring states from the checkpoint" in out
    second = tmp_path / "runs" / "quickstart" / "version_1"
    ckpt = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 6  # 3 steps per epoch, 2 epochs in all
    assert (second / "checkpoints" / "epoch=1-step=6.ckpt").is_file()
    steps = [int(r["step"]) for r in _read_csv(second / "metrics.csv") if r.get("step")]
    assert steps and min(steps) >= 3  # the resumed run logs after the first run's steps
    # a third call with nothing left to train is a no-op resume from the newest last.ckpt
    out = _run(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"], tmp_path, "fit3")
    assert f"resuming from {second / 'checkpoints' / 'last.ckpt'}" in out


# ----------------------------------------------------------------------------- 2D Matryoshka
def test_two_process_2d_fit_and_grid_equal_one_process(eval_setup):
    """2D Matryoshka does not train under 2-process DDP, or its 2-process validation logs other (block, size)
    accuracies than one process validating the same checkpoint on the odd-sized set."""
    vit = ["--model.backbone", "test_vit", "--model.optimizer", "adamw", "--model.lr", "1e-3",
           "--model.eval_layers", "[2, 4]"]
    work = eval_setup["root"] / "fit_2d"
    _write_config(work, "imagefolder", eval_setup, batch_size=2)
    _run(["fit", "--config", "config.yaml", *vit, "--model.matryoshka_2d", "{}", "--trainer.max_epochs", "1",
          "--trainer.num_sanity_val_steps", "0", *_trainer_args(2, work / "runs")], work, "fit")
    (ckpt,) = (work / "runs" / "t" / "version_0" / "checkpoints").glob("*.ckpt")
    assert ckpt.name == "epoch=0-step=3.ckpt"  # 12 training images, 2 ranks, batch 2: sharded
    # one process in a process of its own: in-process, after the rest of the suite, this CLI's parser was once
    # built without the model's class_names (an order-dependent jsonargparse state, not reproduced alone)
    _run(["validate", "--config", "config.yaml", *vit, "--ckpt_path", str(ckpt), *_trainer_args(1, work / "one")],
         work, "validate")
    logged = {}
    for devices, run in ((2, work / "runs"), (1, work / "one")):
        rows = _read_csv(run / "t" / "version_0" / "metrics.csv")
        logged[devices] = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/top") and v}
    assert {"val/top1@L2/8", "val/top1@L4/64", "val/top1@64"} <= set(logged[1])
    assert logged[2] == pytest.approx(logged[1], abs=1e-7)
