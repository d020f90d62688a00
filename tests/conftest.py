"""Shared fixtures of the mrl-vision test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"

# The dims of timm's tiny ``test_resnet`` (width 96) under the default rule.
TEST_RESNET_WIDTH = 96
TEST_RESNET_DIMS = [8, 16, 32, 64, 96]

# The quickstart through the real CLI with timm's tiny test_resnet: fast enough for tests.
QUICKSTART_ARGS = [
    "--config", str(QUICKSTART_CONFIG),
    "--model.backbone", "test_resnet",
    "--trainer.accelerator", "cpu",
    "--data.init_args.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
]


def short_quickstart_fit(work: Path):
    """A short real ``mrl-vision fit`` in ``work`` (1 epoch of 2 train batches, 2 val batches); the CLI."""
    from mrl_vision.cli import cli

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(sys, "argv", ["mrl-vision"])
        c = cli(["fit", *QUICKSTART_ARGS, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "2"])
        c.checkpoint = Path(c.trainer.checkpoint_callback.last_model_path).resolve()
    return c


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """One short real quickstart fit shared by the test files that only read it (embed, retrieve,
    export): ``work``, ``ckpt`` (its last.ckpt) and ``run`` (the run folder, with config.yaml)."""
    from types import SimpleNamespace

    work = tmp_path_factory.mktemp("quickstart_run")
    c = short_quickstart_fit(work)
    return SimpleNamespace(work=work, ckpt=c.checkpoint, run=c.checkpoint.parent.parent)


def run_console(args: list[str], work: Path, name: str, timeout: float = 240) -> str:
    """``python -m mrl_vision.cli ARGS`` in ``work`` (CPU only, a fresh DDP rendezvous); returns its output.
    Fails the test on a non-zero exit or an overrun, killing the whole process group (rank 0 and the
    ranks it launched), so a hung rank fails the test instead of hanging the suite."""
    import os
    import signal
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "MRL_VISION_RESUME_FROM")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: one thread each, not two waiting on each other
    log_path = work / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mrl_vision.cli", *args], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{name} did not finish in {timeout} s:\n{log_path.read_text()[-3000:]}")
    out = log_path.read_text()
    assert rc == 0, out[-5000:]
    return out


JPEG_CLASSES = ("cat", "dog", "fox")
JPEG_TRAIN_PER_CLASS = 4
JPEG_VAL_PER_CLASS = 2


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory: ``runs/`` and any file written relative to the cwd land here.

    ``sys.argv`` is reset so that LightningCLI(args=...) does not also see pytest's arguments.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])
    return tmp_path


def write_jpeg_tree(
    root: Path,
    classes: tuple[str, ...] = JPEG_CLASSES,
    train_per_class: int = JPEG_TRAIN_PER_CLASS,
    val_per_class: int = JPEG_VAL_PER_CLASS,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<class>/*.jpg``: real JPEG files of random pixels, odd sizes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.jpg", format="JPEG")
    return root


@pytest.fixture
def jpeg_tree(tmp_path: Path) -> Path:
    """A tiny ImageFolder tree of real JPEGs: 3 classes, 4 train and 2 val images each."""
    return write_jpeg_tree(tmp_path / "images")


# Constant-colour JPEGs whose class and index can be read back from their pixels: the class's own
# channel (red, green or blue) at COLOUR_HIGH, the other two at COLOUR_LOW + COLOUR_STEP * i for the
# i-th image of the class. Folder names sort to blue, green, red, so labels differ from channels.
COLOUR_CLASSES = ("red", "green", "blue")
COLOUR_HIGH, COLOUR_LOW, COLOUR_STEP = 230, 16, 24
COLOUR_TRAIN_PER_CLASS = 5
COLOUR_VAL_PER_CLASS = 2


def colour_of(name: str, i: int) -> tuple[int, int, int]:
    """The RGB colour of image ``i`` of class ``name`` in a colour tree."""
    rgb = [COLOUR_LOW + COLOUR_STEP * i] * 3
    rgb[COLOUR_CLASSES.index(name)] = COLOUR_HIGH
    return tuple(rgb)


def write_colour_jpeg_tree(
    root: Path,
    train_per_class: int = COLOUR_TRAIN_PER_CLASS,
    val_per_class: int = COLOUR_VAL_PER_CLASS,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<colour>/*.jpg``: real JPEGs of one constant colour each, odd sizes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in COLOUR_CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
                pixels = np.empty((h, w, 3), dtype=np.uint8)
                pixels[:] = colour_of(c, i)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.jpg", format="JPEG", quality=95)
    return root

