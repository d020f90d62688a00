"""Resuming: ``fit --ckpt_path last`` picks the newest readable checkpoint of the same model, an
unreadable checkpoint is named with its path, checkpoints are written atomically, and a resumed run
draws the random numbers the uninterrupted run draws (``mrl_vision.rng.RNGStateCheckpoint``).

The kill-and-resume soak through the real console entry point is ``tests/test_soak.py`` (slow).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import QUICKSTART_ARGS, short_quickstart_fit
from mrl_vision import MatryoshkaClassifier
from mrl_vision.cli import cli
from mrl_vision.data import QuickstartDataModule
from mrl_vision.resume import (
    RESUME_ENV,
    AtomicCheckpointIO,
    architecture_differences,
    check_checkpoint,
    resolve_last_checkpoint,
    use_atomic_checkpoint_io,
)
from mrl_vision.rng import RNGStateCheckpoint, collect_rng_states, set_rng_states


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A short real ``fit`` (test_resnet): ``runs/quickstart/version_0/checkpoints/{epoch=0-step=2,last}.ckpt``."""
    work = tmp_path_factory.mktemp("resume")
    c = short_quickstart_fit(work)
    assert c.checkpoint == (work / "runs/quickstart/version_0/checkpoints/last.ckpt").resolve()
    return work


@pytest.fixture
def work(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the trained run folder as the working directory (the resolver's env var reset)."""
    shutil.copytree(trained / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])
    monkeypatch.setenv(RESUME_ENV, "")  # restored (removed) after the test; resolve sets it
    return tmp_path


V0 = os.path.join("runs", "quickstart", "version_0", "checkpoints")
V1 = os.path.join("runs", "quickstart", "version_1", "checkpoints")


def _built(*args: str):
    """The CLI's trainer and model for this fit (``run=False``: nothing trains)."""
    c = cli([*QUICKSTART_ARGS, *args], run=False)
    return c.trainer, c.model


def _newer_copy(src: str, dst_dir: str, edit=None, truncate: bool = False) -> str:
    """Copy checkpoint ``src`` into ``dst_dir`` (newer mtime), edited by ``edit(ckpt)`` or cut in half."""
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, os.path.basename(src))
    if edit is not None:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, dst)
    else:
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2] if truncate else data)
    newest = max(os.path.getmtime(p) for p in Path("runs").rglob("*.ckpt"))
    os.utime(dst, (newest + 10, newest + 10))
    return dst


# ----------------------------------------------------------------------------- --ckpt_path last
def test_truncated_newest_falls_back_to_older_readable(work, capsys):
    """`last` picks a truncated newest checkpoint (a torch traceback at load), or skips it silently."""
    bad = _newer_copy(os.path.join(V0, "last.ckpt"), V1, truncate=True)
    trainer, model = _built()
    capsys.readouterr()
    path = resolve_last_checkpoint(trainer, model)
    out = capsys.readouterr().out
    assert path == os.path.join(V0, "last.ckpt")
    assert f"skipping {bad}: it is unreadable (truncated or corrupt" in out
    assert f"resuming from {path} (the newest usable checkpoint; 1 newer skipped)" in out
    assert os.environ[RESUME_ENV] == path  # handed to DDP ranks


def test_checkpoint_of_another_backbone_is_skipped(work, capsys):
    """A newer checkpoint of another model in the same folder (composed configs log every model to
    runs/cpu/) is taken by `last`, which then fails with a size mismatch."""
    def other(ckpt):
        ckpt["hyper_parameters"]["backbone"] = "test_efficientnet"

    skipped = _newer_copy(os.path.join(V0, "last.ckpt"), V1, edit=other)
    trainer, model = _built()
    assert resolve_last_checkpoint(trainer, model) == os.path.join(V0, "last.ckpt")
    assert (f"skipping {skipped}: it is of another model (backbone: checkpoint test_efficientnet, this run test_resnet)"
            in capsys.readouterr().out)


def test_no_checkpoint_of_this_model_is_an_error_naming_the_hyperparameters(work, capsys):
    """`last` with only another backbone's checkpoints starts from scratch silently or fails with a
    100-line size mismatch instead of naming the differing hyperparameter."""
    with pytest.raises(SystemExit) as e:
        cli(["fit", *QUICKSTART_ARGS, "--model.backbone", "test_efficientnet", "--ckpt_path", "last"])
    message = str(e.value)
    assert message.startswith("mrl-vision fit: error: --ckpt_path last: none of the 2 checkpoints fits this run")
    assert f"the newest, {os.path.join(V0, 'last.ckpt')}, is of another model" in message
    assert "backbone: checkpoint test_resnet, this run test_efficientnet" in message
    assert "\n" not in message
    assert not Path("runs/quickstart/version_1").exists()  # nothing trained


def test_other_differences_are_named_and_default_dims_match(work):
    """A checkpoint with other dims/head/classes passes for this model, or the default dims
    (`dims: null`) count as different from the same sizes written out."""
    hp = check_checkpoint(os.path.join(V0, "last.ckpt"))["hyper_parameters"]
    assert hp["backbone"] == "test_resnet" and hp["num_classes"] == 10
    default = {**hp, "dims": None}
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet", dims=[8, 16, 32, 64, 96])
    assert architecture_differences(default, model) == []  # the default sizes, written out
    assert architecture_differences({**hp, "dims": [8, 16, 32, 64, 96]}, MatryoshkaClassifier(
        num_classes=10, backbone="test_resnet")) == []
    narrow = MatryoshkaClassifier(num_classes=3, backbone="test_resnet", head="mrl_e", dims=[8, 96])
    assert architecture_differences(default, narrow) == [
        "head: checkpoint mrl, this run mrl_e",
        "dims: checkpoint default, this run [8, 96]",
        "num_classes: checkpoint 10, this run 3",
    ]
    old = {**{k: v for k, v in hp.items() if k != "dims"}, "nesting": [8, 16, 32, 64, 96]}  # an old spelling
    assert architecture_differences(old, model) == []


def test_weights_only_checkpoint_is_skipped(work, capsys):
    """`last` picks a save_weights_only checkpoint, which cannot resume (no optimizer state)."""
    def weights_only(ckpt):
        for key in ("optimizer_states", "lr_schedulers", "callbacks", "loops"):
            ckpt.pop(key, None)

    skipped = _newer_copy(os.path.join(V0, "last.ckpt"), V1, edit=weights_only)
    trainer, model = _built()
    assert resolve_last_checkpoint(trainer, model) == os.path.join(V0, "last.ckpt")
    assert f"skipping {skipped}: it holds the weights only" in capsys.readouterr().out


def test_no_checkpoint_at_all_starts_from_scratch(tmp_path, monkeypatch):
    """`last` with no checkpoint anywhere fails instead of warning and starting from scratch."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])
    monkeypatch.setenv(RESUME_ENV, "")
    trainer, model = _built()
    with pytest.warns(UserWarning, match="no checkpoint under"):
        assert resolve_last_checkpoint(trainer, model) is None


def test_ddp_ranks_take_the_path_of_rank_zero(work, monkeypatch):
    """A launched DDP rank resolves again (and may pick another file) instead of taking rank 0's path."""
    monkeypatch.setenv(RESUME_ENV, "chosen/by/rank0.ckpt")
    monkeypatch.setenv("LOCAL_RANK", "1")
    trainer, model = _built()
    assert resolve_last_checkpoint(trainer, model) == "chosen/by/rank0.ckpt"


# ----------------------------------------------------------------------------- --ckpt_path FILE
def test_check_checkpoint_names_the_path_of_a_truncated_file(work):
    """A truncated checkpoint gives a torch unpickling traceback instead of one line naming its path."""
    good = os.path.join(V0, "last.ckpt")
    assert "state_dict" in check_checkpoint(good)
    bad = _newer_copy(good, V1, truncate=True)
    with pytest.raises(ValueError) as e:
        check_checkpoint(bad)
    message = str(e.value)
    assert message.startswith(f"checkpoint {bad!r} is unreadable (truncated or corrupt, ")
    assert "\n" not in message
    Path("empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="'empty.ckpt' is unreadable .*0 bytes"):
        check_checkpoint("empty.ckpt")
    torch.save([1, 2], "list.ckpt")
    with pytest.raises(ValueError, match="'list.ckpt' is not a Lightning checkpoint"):
        check_checkpoint("list.ckpt")
    with pytest.raises(FileNotFoundError, match="'missing.ckpt' does not exist"):
        check_checkpoint("missing.ckpt")


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    """A save that dies half-way leaves a truncated checkpoint (or a stray temporary file)."""
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))

    def dies_half_way(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("mrl_vision.resume.torch.save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(check_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_atomic_checkpoint_io_as_a_trainer_plugin():
    """AtomicCheckpointIO is not taken as the Trainer's checkpoint writer, or the helper swaps others."""
    trainer = L.Trainer(accelerator="cpu", plugins=[AtomicCheckpointIO()], logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    plain = L.Trainer(accelerator="cpu", logger=False)
    assert type(plain.strategy.checkpoint_io) is TorchCheckpointIO
    assert use_atomic_checkpoint_io(plain) and isinstance(plain.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not use_atomic_checkpoint_io(plain)


# ----------------------------------------------------------------------------- RNG states
def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """The saved RNG states do not load with weights_only=True, or do not restore torch, numpy and random."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng": collect_rng_states("cpu")}, tmp_path / "s.ckpt")
    first = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    set_rng_states(torch.load(tmp_path / "s.ckpt", weights_only=True)["rng"], "cpu")
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def _fit(root: Path, epochs: int, rng_callback: bool, ckpt_path: str | None = None) -> MatryoshkaClassifier:
    L.seed_everything(0)
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet", lr=0.05, lr_schedule="constant")
    dm = QuickstartDataModule(batch_size=16)  # augmented: RandomResizedCrop draws from torch's RNG
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True)] + ([RNGStateCheckpoint()] if rng_callback else [])
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=3, limit_val_batches=1,
                        deterministic=True, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("rng_callback", [True, False])
def test_resumed_fit_draws_what_the_uninterrupted_fit_draws(tmp_path, rng_callback):
    """With RNGStateCheckpoint, 2 epochs + a resumed 3rd end with other weights than 3 epochs at once
    (the 3rd epoch's shuffle and crops drawn from another RNG state); without it they must differ,
    or this test would prove nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = _fit(tmp_path / "whole", 3, rng_callback)
        _fit(tmp_path / "parts", 2, rng_callback)
        resumed = _fit(tmp_path / "resumed", 3, rng_callback, ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    finally:
        torch.set_num_threads(threads)
    a, b = whole.state_dict(), resumed.state_dict()
    same = all(_equal(a[k], b[k]) for k in a)
    assert same == rng_callback


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, NaN equal to NaN (the unfitted cascade thresholds are NaN)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


def test_resuming_a_checkpoint_without_rng_states_warns(tmp_path):
    """Resuming with RNGStateCheckpoint from a checkpoint written without it claims nothing, or fails."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(tmp_path / "parts", 1, rng_callback=False)
        with pytest.warns(UserWarning, match="holds no RNG states"):
            _fit(tmp_path / "resumed", 2, rng_callback=True, ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    finally:
        torch.set_num_threads(threads)
