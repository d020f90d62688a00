"""Faults around `mrl-vision prepare` and the files it writes: bytes changed in place (the checksum),
Ctrl-C / SIGTERM / kill -9 while writing (writer processes, temporary files). CPU only, no mocks:
the signals go to a real `prepare` in a subprocess of its own process group, which every test's
teardown kills whole, so that a failing test leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ffcv = pytest.importorskip("ffcv")

from ffcv.reader import Reader  # noqa: E402

from mrl_vision.cli import main, prepare  # noqa: E402
from mrl_vision.data import FFCVDataModule  # noqa: E402
from mrl_vision.data import beton  # noqa: E402
from mrl_vision.data.beton import check_beton, remove_stale_temp_files  # noqa: E402

try:
    import psutil
except ImportError:  # the /proc fallback below
    psutil = None

SLOW_PER_CLASS = 400  # 800 large JPEGs: about 30 s of writing with 2 workers, interrupted after 1 s
HOST = beton._host()


# ----------------------------------------------------------------------------- helpers
def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``pgid`` (psutil, else /proc)."""
    found = []
    if psutil is not None:
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return found
    for d in Path("/proc").iterdir():
        try:
            state, _ppid, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):
            continue
        if d.name.isdigit() and int(pgrp) == pgid and state not in ("Z", "X"):
            found.append(int(d.name))
    return found


def wait_until(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def temp_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def corrupt_middle_image(path: Path, span: int = 64) -> None:
    """Invert ``span`` bytes of the middle sample's image data, in place (the file keeps its size)."""
    ptrs = Reader(str(path)).metadata["f0"]["data_ptr"]
    offset = int(ptrs[len(ptrs) // 2])
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(span)
        f.seek(offset)
        f.write(bytes(255 - b for b in data))
    assert path.stat().st_size == size and offset > 1024


def copy_beton(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copyfile(src, dst)
    shutil.copyfile(str(src) + ".json", str(dst) + ".json")
    return dst


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """200 quickstart digits (20 per class) written by `prepare` to val.beton."""
    out = tmp_path_factory.mktemp("digits") / "val.beton"
    main(["prepare", "quickstart", str(out), "--split", "val", "--limit", "20", "--num-workers", "1"])
    return out


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory) -> Path:
    """A folder tree that takes a while to prepare: 2 classes of one 1200 px JPEG, hard-linked."""
    from PIL import Image

    root = tmp_path_factory.mktemp("slow_tree")
    first = None
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(SLOW_PER_CLASS):
            path = root / c / f"{c}_{i:04d}.jpg"
            if first is None:
                pixels = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, quality=90)
                first = path
            else:
                os.link(first, path)
    return root


@pytest.fixture
def spawn(tmp_path):
    """Start `mrl-vision prepare ARGS` in a new process group: ``spawn(*args)`` -> (Popen, stderr path).
    Teardown kills every process left in the groups it started."""
    started = []

    def start(*args: str):
        err = tmp_path / f"stderr_{len(started)}.txt"
        with open(err, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "mrl_vision.cli", "prepare", *args], cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
        started.append(proc)
        return proc, err

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):  # the group is empty
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def start_slow_prepare(spawn, slow_tree: Path, out: Path) -> SimpleNamespace:
    """`prepare` of the slow tree with 2 writer processes; returns once they are writing."""
    proc, err = spawn(str(slow_tree), str(out), "--num-workers", "2", "--max-resolution", "64")

    def writing() -> bool:
        assert proc.poll() is None, f"prepare ended (status {proc.returncode}) before the test: {err.read_text()[-2000:]}"
        return bool(temp_files(out)) and len(group_members(proc.pid)) >= 3  # prepare + 2 writers (+ tracker)

    assert wait_until(writing, timeout=240), "prepare did not start its writer processes within 240 s"
    time.sleep(1.0)  # well inside the writing (about 30 s)
    assert proc.poll() is None
    return SimpleNamespace(proc=proc, err=err, children=[p for p in group_members(proc.pid) if p != proc.pid])


# ----------------------------------------------------------------------------- checksum
def test_prepare_records_a_checksum_and_an_intact_file_passes(digits, capsys):
    """The sidecar records no checksum, or an intact file fails its verification."""
    info = json.loads(Path(str(digits) + ".json").read_text())
    assert info["checksum"] == beton.file_checksum(digits) and info["checksum"].startswith("sha256:")
    assert check_beton(digits, verify_checksum=True) == info
    FFCVDataModule(val_path=str(digits), num_workers=1)
    assert prepare(["--verify", str(digits)]) == info
    assert f"{digits}: OK, sha256 checksum matches (200 samples, 10 classes" in capsys.readouterr().out


def test_bytes_changed_in_place_are_detected(digits, tmp_path, capsys):
    """Image bytes overwritten in the middle of the data (same size) pass unnoticed by the data
    module and by `prepare --verify`."""
    bad = copy_beton(digits, tmp_path)
    corrupt_middle_image(bad)
    check_beton(bad, verify_checksum=False)  # size, header and labels cannot see it
    with pytest.raises(ValueError, match="differs from what `mrl-vision prepare` wrote") as exc:
        FFCVDataModule(val_path=str(bad), num_workers=1)  # default: verified (a small file)
    assert str(bad) in str(exc.value) and "prepare it again" in str(exc.value)
    with pytest.raises(SystemExit) as exc:  # a message: exit status 1
        main(["prepare", "--verify", str(bad)])
    assert str(exc.value.code).startswith("mrl-vision prepare: error: FFCV file ")
    assert str(bad) in str(exc.value.code) and "differs from what" in str(exc.value.code)
    assert "OK" not in capsys.readouterr().out


def test_verify_checksum_option(digits, tmp_path, monkeypatch):
    """verify_checksum=None does not verify up to VERIFY_MAX_BYTES only, True always, False never."""
    bad = copy_beton(digits, tmp_path)
    corrupt_middle_image(bad)
    FFCVDataModule(val_path=str(bad), num_workers=1, verify_checksum=False)  # never
    monkeypatch.setattr(beton, "VERIFY_MAX_BYTES", bad.stat().st_size - 1)
    FFCVDataModule(val_path=str(bad), num_workers=1)  # auto: above the threshold, not read
    with pytest.raises(ValueError, match="differs from what"):
        FFCVDataModule(val_path=str(bad), num_workers=1, verify_checksum=True)  # always
    monkeypatch.setattr(beton, "VERIFY_MAX_BYTES", bad.stat().st_size)
    with pytest.raises(ValueError, match="differs from what"):
        FFCVDataModule(val_path=str(bad), num_workers=1)  # auto: at the threshold, read


def test_an_old_sidecar_without_checksum_warns_and_passes(digits, tmp_path, capsys):
    """A sidecar from before checksums fails the file, or passes it without a word."""
    old = copy_beton(digits, tmp_path)
    side = Path(str(old) + ".json")
    info = json.loads(side.read_text())
    del info["checksum"]
    side.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="sidecar has no checksum") as record:
        FFCVDataModule(val_path=str(old), num_workers=1)
    (warning,) = [str(w.message) for w in record if "checksum" in str(w.message)]
    assert "\n" not in warning and str(old) in warning
    main(["prepare", "--verify", str(old)])  # exit status 0
    cap = capsys.readouterr()
    assert "contents not verified: no checksum recorded" in cap.out
    assert cap.err.count("\n") == 1 and "warning:" in cap.err and "no checksum" in cap.err


def test_verify_rejects_extra_arguments_and_missing_files(digits, tmp_path, capsys):
    """`prepare --verify` accepts SOURCE/OUTPUT with it, or a missing file, silently."""
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "quickstart", "--verify", str(digits)])
    assert exc.value.code == 2 and "takes no SOURCE or OUTPUT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--verify", str(tmp_path / "none.beton")])
    assert "does not exist" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "quickstart"])
    assert exc.value.code == 2 and "required: output" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stale temporary files
def test_stale_temporary_files_are_removed_by_the_next_prepare(tmp_path, capsys):
    """A temporary file of a killed prepare stays forever, or one of a live writer is removed."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is no longer running
    out = tmp_path / "x.beton"
    stale = tmp_path / f".x.beton.{HOST}.pid{gone.pid}.abc_123.tmp"
    stale_log = Path(str(stale) + ".errors")
    live = tmp_path / f".x.beton.{HOST}.pid{os.getppid()}.def456.tmp"  # our parent: running
    other_host = tmp_path / f".x.beton.elsewhere-{HOST}.pid{gone.pid}.ghi789.tmp"
    other_target = tmp_path / f".y.beton.{HOST}.pid{gone.pid}.jkl012.tmp"
    older = tmp_path / ".x.beton.k2j4h_9a.tmp"  # mkstemp's name, from before the pid was in it
    for p in (stale, stale_log, live, other_host, other_target, older):
        p.write_bytes(b"\0" * 1000)
    main(["prepare", "quickstart", str(out), "--split", "test", "--limit", "2", "--num-workers", "1"])
    err = capsys.readouterr().err
    assert not stale.exists() and not stale_log.exists()
    assert all(p.exists() for p in (live, other_host, other_target, older))
    assert f"removed {str(stale)!r}" in err and f"pid {gone.pid} is gone" in err
    assert f"{str(older)!r} looks like a temporary file of an older prepare" in err
    assert check_beton(out)["num_samples"] == 20
    assert remove_stale_temp_files(out) == []  # nothing left to remove; the new file is not touched
    assert sorted(p.name for p in tmp_path.glob(".x.beton.*")) == sorted(p.name for p in (live, other_host, older))


# ----------------------------------------------------------------------------- signals (subprocesses)
@pytest.mark.slow
@pytest.mark.parametrize("signame, to", [("SIGINT", "pid"), ("SIGINT", "group"), ("SIGTERM", "pid")])
def test_interrupted_prepare_stops_quickly_and_cleans_up(signame, to, slow_tree, spawn, tmp_path):
    """SIGINT (to prepare alone, or to its group as Ctrl-C does) or SIGTERM leaves prepare running
    for minutes, the writers alive or a temporary file behind. About 15 s each on 2 cores, mostly
    the start-up (torch, Lightning and ffcv imports)."""
    out = tmp_path / "out" / "slow.beton"
    run = start_slow_prepare(spawn, slow_tree, out)
    signum = getattr(signal, signame)
    sent = time.monotonic()
    (os.killpg if to == "group" else os.kill)(run.proc.pid, signum)
    try:
        status = run.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"prepare still running 10 s after {signame}: {run.err.read_text()[-2000:]}")
    took = time.monotonic() - sent
    err = run.err.read_text()
    assert status == 128 + signum, (status, err[-2000:])
    last = err.rstrip("\n").splitlines()[-1]
    assert last == f"mrl-vision prepare: interrupted by {signame}; nothing was written to {out}", err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert wait_until(lambda: not group_members(run.proc.pid), timeout=5), \
        f"processes left after {signame}: {group_members(run.proc.pid)} (writers were {run.children})"
    assert list(out.parent.iterdir()) == [], "a temporary or partial file was left"
    assert took < 10


@pytest.mark.slow
def test_kill_9_leaves_no_writer_and_the_next_prepare_removes_its_file(slow_tree, spawn, tmp_path):
    """kill -9 of prepare leaves its writer processes running, or a temporary file that the next
    prepare of the same target keeps. About 30 s on 2 cores (two start-ups: torch, Lightning, ffcv)."""
    out = tmp_path / "out" / "slow.beton"
    run = start_slow_prepare(spawn, slow_tree, out)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(timeout=10)
    assert wait_until(lambda: not group_members(run.proc.pid), timeout=5), \
        f"writer processes alive 5 s after kill -9: {group_members(run.proc.pid)}"
    (stale,) = temp_files(out)
    assert f".pid{run.proc.pid}." in stale.name
    proc, err = spawn("quickstart", str(out), "--split", "test", "--limit", "2", "--num-workers", "1")
    assert proc.wait(timeout=240) == 0, err.read_text()[-2000:]
    assert f"removed {str(stale)!r}" in err.read_text() and f"pid {run.proc.pid} is gone" in err.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["slow.beton", "slow.beton.json"]
    assert check_beton(out, verify_checksum=True)["num_samples"] == 20
