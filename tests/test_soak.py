"""Soak: ``fit`` killed with SIGKILL at 5 random moments, resumed each time with ``--ckpt_path last``,
ends exactly where an uninterrupted run with the same seed ends (CPU, deterministic mode).

The run: the quickstart digits with timm's tiny ``test_resnet``, 8 epochs of 4 batches of 16 images
(2 validation batches), ``--trainer.deterministic true``, with ``mrl_vision.rng.RNGStateCheckpoint``
(the RNG states in each checkpoint) and ``mrl_vision.resume.AtomicCheckpointIO`` (checkpoints renamed
into place). It runs once uninterrupted, then as ``fit --ckpt_path last`` again and again, each
process killed with SIGKILL (with its process group) at a seeded random moment: a random time of
up to one epoch after the checkpoint of a random epoch (or after the run's log folder appears), cut
short when the next epoch's checkpoint appears, so kills land in restoring, training steps,
validation and checkpoint saves, and no killed run gets past epoch 6 of 8 (the last one killed,
when it resumes after epoch 6, within half an epoch of its start). After the 5th kill the next
``fit --ckpt_path last`` finishes. Then the final ``last.ckpt`` of both are equal exactly (every
weight and buffer, the optimizer and scheduler states, the epoch and step, the RNG states) as are
the per-size validation accuracies (``val/top1@*``) that the finishing run logged for its epochs.
Without ``RNGStateCheckpoint`` they differ (the resumed epoch is shuffled and cropped from another
RNG state; ``tests/test_resume.py`` checks both ways in one process).

Seconds: about 70 s on 2 idle cores (7 sequential one-thread processes, 60-85 s of CPU time measured
in all; start-up of Python, torch and Lightning is most of it); 75-125 s here while other test
suites shared the 2 cores. Each process has its own timeout (RUN_TIMEOUT).
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import QUICKSTART_CONFIG

pytestmark = pytest.mark.slow

EPOCHS = 8
KILLS = 5
SEED = 20240611  # of the kill moments
RUN_TIMEOUT = 300  # seconds, each process

# The quickstart's callbacks (its own list replaced, so that this test does not depend on which the
# config has) plus the RNG states, and the atomic checkpoint writer.
SOAK_CONFIG = {
    "trainer": {
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_epochs": 1, "save_last": True}},
            {"class_path": "mrl_vision.callbacks.AdaptiveClassificationCallback",
             "init_args": {"method": "tolerance", "tolerance": 0.005}},
            {"class_path": "mrl_vision.rng.RNGStateCheckpoint"},
        ],
        "plugins": [{"class_path": "mrl_vision.resume.AtomicCheckpointIO"}],
    },
}


def _fit_args(work: Path) -> list[str]:
    return ["fit", "--config", str(QUICKSTART_CONFIG), "--config", str(work / "soak.yaml"),
            "--model.backbone", "test_resnet", "--model.lr", "0.05",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.deterministic", "true",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", "4",
            "--trainer.limit_val_batches", "2", "--data.init_args.batch_size", "16",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", "runs", "--ckpt_path", "last"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "MRL_VISION_RESUME_FROM")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # One thread per run: on 2 shared cores, 2 OpenMP threads contending with other work are ~8x slower
    # here; the arithmetic is the same in both runs either way (the equality also holds with 2 threads).
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    return env


def _start(work: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = work / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mrl_vision.cli", *_fit_args(work)], cwd=work, env=_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _versions(work: Path) -> set[Path]:
    return set((work / "runs" / "quickstart").glob("version_*"))


def _epochs_saved(version: Path) -> list[int]:
    """Epochs E of the ``epoch=E-step=S.ckpt`` files in ``version`` (renamed into place: complete)."""
    names = (p.name for p in (version / "checkpoints").glob("epoch=*.ckpt")) if version else ()
    return [int(m.group(1)) for n in names if (m := re.match(r"epoch=(\d+)-", n))]


def _wait(proc: subprocess.Popen, until, log: Path, what: str, deadline: float) -> None:
    """Poll every 10 ms until ``until()`` holds; fails when the process exits or overruns first."""
    while not until():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit status {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"no {what} within {RUN_TIMEOUT} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"fit did not finish in {RUN_TIMEOUT} s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert rc == 0, out[-5000:]
    return out


def _newest_epoch(work: Path) -> int:
    """The epoch of the newest checkpoint ``fit --ckpt_path last`` would take (-1: none)."""
    from mrl_vision.resume import check_checkpoint

    files = sorted((work / "runs").glob("quickstart/*/checkpoints/*.ckpt"), key=os.path.getmtime, reverse=True)
    for f in files:
        try:
            return int(check_checkpoint(f)["epoch"])
        except ValueError:  # not expected with AtomicCheckpointIO; the resolver skips it too
            continue
    return -1


def _val_rows(version: Path) -> dict[int, dict[str, str]]:
    """``epoch -> {val/top1@m: value}`` of a run's metrics.csv."""
    with open(version / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        vals = {k: v for k, v in r.items() if k.startswith("val/top1@") and v}
        if vals:
            out[int(r["epoch"])] = vals
    return out


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Nested checkpoint entries equal exactly (tensors bit for bit)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, path
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b  # NaN: unfitted thresholds
        assert bool(same.all()), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"  # NaN == NaN here


def test_sigkill_five_times_then_resume_equals_uninterrupted(tmp_path):
    """A run killed 5 times and resumed with --ckpt_path last ends with other weights or metrics than
    an uninterrupted run with the same seed, or does not finish."""
    rng = random.Random(SEED)
    t0 = time.monotonic()

    # -- uninterrupted, timing its epochs (when each epoch's checkpoint appears)
    ref = tmp_path / "uninterrupted"
    ref.mkdir()
    (ref / "soak.yaml").write_text(yaml.safe_dump(SOAK_CONFIG))
    proc, log = _start(ref, "fit")
    seen: dict[int, float] = {}
    version = ref / "runs" / "quickstart" / "version_0"
    while proc.poll() is None and time.monotonic() - t0 < RUN_TIMEOUT:
        for e in _epochs_saved(version):
            seen.setdefault(e, time.monotonic())
        time.sleep(0.01)
    out = _finish(proc, log)
    assert "no checkpoint under" in out  # `last` with nothing to resume: from scratch, with a warning
    times = [seen[e] for e in sorted(seen)]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    epoch_time = gaps[len(gaps) // 2] if gaps else 1.0  # the median

    # -- killed at random moments, resumed each time
    work = tmp_path / "interrupted"
    work.mkdir()
    (work / "soak.yaml").write_text(yaml.safe_dump(SOAK_CONFIG))
    moments = []
    for k in range(KILLS):
        # Kill after the checkpoint of epoch `anchor` (or after the run's log folder appears, when the
        # anchor is the epoch it resumes after) plus `delay`, and at the latest when the next epoch's
        # checkpoint appears: no run gets past epoch EPOCHS - 2, so the final run trains (and logs) one
        # epoch at least.
        resumed_at = _newest_epoch(work)  # the resolver takes this one (checked below from the log)
        assert resumed_at <= EPOCHS - 2
        anchor = rng.randint(resumed_at, EPOCHS - 3) if resumed_at <= EPOCHS - 3 else resumed_at
        delay = rng.uniform(0.0, 1.0 if anchor < EPOCHS - 2 else 0.5) * epoch_time
        before = _versions(work)
        proc, log = _start(work, f"fit{k}")
        deadline = time.monotonic() + RUN_TIMEOUT
        _wait(proc, lambda: _versions(work) - before, log, "the run started", deadline)
        (new,) = _versions(work) - before
        if anchor > resumed_at:
            _wait(proc, lambda: max(_epochs_saved(new), default=-1) >= anchor, log, f"the checkpoint of epoch {anchor}",
                  deadline)
        kill_at = time.monotonic() + delay
        while time.monotonic() < kill_at and max(_epochs_saved(new), default=-1) <= anchor and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run finished before its kill:\n{log.read_text()[-3000:]}"
        _kill(proc)
        moments.append((resumed_at, anchor, round(delay, 3)))
        if resumed_at >= 0:
            assert "resuming from" in log.read_text()
    before = _versions(work)
    proc, log = _start(work, "final")
    out = _finish(proc, log)
    (final,) = _versions(work) - before
    print(f"kills (resumed after epoch, killed after epoch's checkpoint + s): {moments}; epoch {epoch_time:.2f} s; "
          f"{time.monotonic() - t0:.0f} s in all")

    # -- the same end: the checkpoints and the logged per-size accuracies
    a = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(final / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]) == (EPOCHS - 1, 4 * EPOCHS)
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        _assert_same_state(a[key], b[key], key)
    rng_key = next(k for k in a["callbacks"] if "RNGStateCheckpoint" in k)
    _assert_same_state(a["callbacks"][rng_key], b["callbacks"][rng_key], "rng")  # even the RNG states end alike
    expected, got = _val_rows(version), _val_rows(final)
    assert sorted(expected) == list(range(EPOCHS)) and got and max(got) == EPOCHS - 1
    assert len(expected[EPOCHS - 1]) == 5  # val/top1@8 ... @96
    for epoch, values in got.items():
        assert values == expected[epoch], f"epoch {epoch}"
