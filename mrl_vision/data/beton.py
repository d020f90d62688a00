"""Writing FFCV ``.beton`` files, and checking them before a loader touches them.

``mrl-vision prepare SOURCE OUTPUT.beton`` turns an image folder tree (``SOURCE/<class>/*.jpg``) or
the built-in ``quickstart`` digits into one FFCV file with an ``image`` and a ``label`` field. The
file is written under a temporary name in the output folder and renamed when complete; a sidecar
``OUTPUT.beton.json`` records the sample count, the class names in label order, the file size and
the write options and a SHA-256 checksum of the whole file, so a data module can tell a complete
file from a truncated, foreign or modified one.

Interruptions: the writer processes die with the process that started them (a ``kill -9`` leaves
none behind); Ctrl-C (and SIGTERM under ``mrl-vision prepare``) stops them and removes the temporary
file; a temporary file left by a killed ``prepare`` (its name holds the host and pid) is removed by
the next ``prepare`` of the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..files import atomic_write_text, file_checksum

SIDECAR_FORMAT = "mrl-vision-beton"
SIDECAR_KEYS = ("format", "num_samples", "classes", "file_size", "fields")
WRITE_MODES = ("raw", "jpg", "proportion", "smart")
CHECKSUM = "sha256"  # SHA-NI makes it the fastest of hashlib's strong hashes on x86 (benchmarks/beton_checksum.py)
# Files up to this size are verified against their checksum by default when a data module opens
# them: reading and hashing 2 GiB from the page cache takes about 2 s on one core.
VERIFY_MAX_BYTES = 2 << 30
FFCV_INSTALL_HINT = (
    "FFCV is not installed: install its system libraries (Debian/Ubuntu: apt-get install "
    "libturbojpeg0-dev libopencv-dev pkg-config), then pip install 'mrl-vision[ffcv]'"
)


def require_ffcv() -> None:
    """Raise ``ImportError`` with the one-line install instruction when ffcv is missing."""
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError(FFCV_INSTALL_HINT) from e


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


# ----------------------------------------------------------------------------- sources
class FolderSource:
    """``root/<class>/<image>`` as (PIL RGB image, label) pairs, optionally ``limit`` per class
    (scanned and read as by ``ImageFolderDataModule``: ``scan_split``, ``read_image``)."""

    def __init__(self, root: str | os.PathLike, limit: int | None = None, allow_empty_classes: bool = False) -> None:
        from .imagefolder import scan_split

        self.classes, samples = scan_split(Path(root), allow_empty_classes=allow_empty_classes)
        if limit is not None:
            samples = [samples[i] for i in first_per_class([t for _, t in samples], limit)]
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    error_log: str | None = None  # set by write_beton: where workers record unreadable images

    def __getitem__(self, i: int):
        from PIL import Image

        from .imagefolder import read_image

        path, label = self.samples[i]
        try:
            return read_image(path), label
        except ValueError as e:  # it names the file; a dead FFCV writer process would hang the parent
            if self.error_log is None:
                raise
            with open(self.error_log, "a") as log:  # one short line: an atomic append
                log.write(f"{e}\n")
            return Image.new("RGB", (8, 8)), label  # placeholder; write_beton then fails


class QuickstartSource:
    """One split of the built-in quickstart digits as (uint8 [28, 28, 3] array, label) pairs."""

    error_log: str | None = None  # the digits are in memory: nothing to fail

    def __init__(self, split: str, seed: int = 0, limit: int | None = None) -> None:
        from .quickstart import load_mnist_digits, stratified_split

        if split not in ("train", "val", "test"):
            raise ValueError(f"--split must be train, val or test for the quickstart dataset, got {split!r}")
        images, labels = load_mnist_digits()
        idx = stratified_split(labels, (0.1, 0.1), seed)[("train", "val", "test").index(split)]
        if limit is not None:
            idx = idx[first_per_class(labels[idx].tolist(), limit)]
        self.images, self.labels = images[idx].numpy(), labels[idx].numpy()
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return np.repeat(self.images[i][:, :, None], 3, axis=2), int(self.labels[i])


def open_source(source: str, split: str = "train", seed: int = 0, limit: int | None = None,
                allow_empty_classes: bool = False) -> "FolderSource | QuickstartSource":
    """What ``prepare`` writes (to FFCV or litdata): the ``quickstart`` digits' ``split``, or the image folder tree
    ``source``; ``FileNotFoundError`` for anything else, ``ValueError`` when it holds no samples."""
    if source == "quickstart":
        dataset = QuickstartSource(split, seed=seed, limit=limit)
    elif Path(source).is_dir():
        dataset = FolderSource(source, limit=limit, allow_empty_classes=allow_empty_classes)
    else:
        raise FileNotFoundError(
            f"source {source!r} is neither an image folder (SOURCE/<class>/<image>) nor 'quickstart'"
        )
    if len(dataset) == 0:
        raise ValueError(f"source {source!r} has no samples to write")
    return dataset


def first_per_class(labels: Sequence[int], limit: int) -> list[int]:
    """Positions of the first ``limit`` samples of each class, in order."""
    if limit < 1:
        raise ValueError(f"--limit must be >= 1 image per class, got {limit}")
    seen: dict[int, int] = {}
    keep = []
    for i, c in enumerate(labels):
        if seen.get(c, 0) < limit:
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    return keep


# ----------------------------------------------------------------------------- interruptions
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received inside :func:`interrupt_on_signals`; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(self.name)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Raise :class:`Interrupted` on SIGINT and SIGTERM inside the block (main thread only), so that
    ``write_beton`` stops its writer processes and removes its temporary file on either."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """In a writer process: be killed when ``parent`` dies (Linux ``PR_SET_PDEATHSIG``, elsewhere a
    thread polling the parent pid); leave Ctrl-C to the parent, take SIGTERM's default action."""
    for signum, action in ((signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_DFL)):
        with contextlib.suppress(ValueError):  # not the main thread: keep the inherited handlers
            signal.signal(signum, action)
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        armed = False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    if not armed:
        def poll() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=poll, name="die-with-parent", daemon=True).start()


class WriterProcess(multiprocessing.Process):
    """An FFCV writer process that dies with the process that started it (see ``die_with_parent``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent = os.getpid()
        self.queues = [a for a in kwargs.get("args", ()) if isinstance(a, Queue)]

    def run(self) -> None:
        die_with_parent(self.parent)
        super().run()


def stop_processes(processes: Sequence[WriterProcess], timeout: float = 3.0) -> None:
    """Terminate the started ``processes`` (SIGTERM, SIGKILL after ``timeout`` s) and reap them; make
    their queues' feeder threads not block the exit (nobody reads those pipes any more)."""
    started = [p for p in processes if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for p in processes:
        for q in p.queues:
            q.cancel_join_thread()


@contextlib.contextmanager
def stoppable_writer() -> Iterator[None]:
    """Inside the block, ffcv's ``DatasetWriter`` starts :class:`WriterProcess` es; on any exception
    (Ctrl-C included) they are stopped and its progress bar closed before the exception propagates."""
    import ffcv.writer

    processes: list[WriterProcess] = []
    bars: list[Any] = []
    previous = ffcv.writer.Process, ffcv.writer.tqdm

    def process(*args: Any, **kwargs: Any) -> WriterProcess:
        processes.append(WriterProcess(*args, **kwargs))
        return processes[-1]

    def bar(*args: Any, **kwargs: Any) -> Any:
        bars.append(previous[1](*args, **kwargs))
        return bars[-1]

    ffcv.writer.Process, ffcv.writer.tqdm = process, bar
    try:
        yield
    except BaseException:
        stop_processes(processes)
        for b in bars:
            b.close()
        raise
    finally:
        ffcv.writer.Process, ffcv.writer.tqdm = previous


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def temp_beton_path(output: Path) -> Path:
    """A new empty temporary file beside ``output``: ``.NAME.HOST.pidPID.RANDOM.tmp``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.{_host()}.pid{os.getpid()}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    return Path(tmp)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


def remove_stale_temp_files(output: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (and folders) of ``output`` left by a ``prepare`` of this host that is no
    longer running (killed mid-write), saying so on stderr; return their paths."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    ours = re.compile(rf"\.{re.escape(output.name)}\.{re.escape(_host())}\.pid(\d+)\.\w+\.tmp(\.errors)?")
    older = re.compile(rf"\.{re.escape(output.name)}\.\w{{8}}\.tmp")  # before pids were in the name
    removed = []
    for p in sorted(output.parent.iterdir()):
        m = ours.fullmatch(p.name)
        if m and not pid_running(int(m.group(1))):
            try:
                if p.is_dir():  # a litdata folder's (chunks.py)
                    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                    shutil.rmtree(p)
                else:
                    size = p.stat().st_size
                    p.unlink()
            except FileNotFoundError:  # another prepare got there first
                continue
            removed.append(p)
            print(f"removed {str(p)!r} ({size:,} bytes): a temporary file of {output.name} left by a prepare "
                  f"that was killed (pid {m.group(1)} is gone)", file=sys.stderr)
        elif older.fullmatch(p.name):
            print(f"note: {str(p)!r} looks like a temporary file of an older prepare of {output.name}; "
                  "delete it if no prepare is writing it", file=sys.stderr)
    return removed


# ----------------------------------------------------------------------------- writing
def write_beton(
    source: str,
    output: str | os.PathLike,
    split: str = "train",
    max_resolution: int | None = None,
    write_mode: str = "raw",
    compress_probability: float = 0.5,
    jpeg_quality: int = 90,
    num_workers: int = -1,
    limit: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    chunksize: int = 100,
    allow_empty_classes: bool = False,
) -> dict[str, Any]:
    """Write ``source`` (a folder tree or ``"quickstart"``) to ``output`` and its sidecar; return the sidecar.

    Options follow FFCV's ImageNet recipe: ``write_mode`` raw (decoded pixels), jpg, proportion
    (JPEG with probability ``compress_probability``) or smart; ``max_resolution`` caps the longer
    side; ``jpeg_quality`` for compressed images. ``split`` and ``seed`` apply to ``quickstart``;
    ``allow_empty_classes`` keeps class folders without images (by default they fail, named).

    The file is written under a temporary name and renamed when complete, after its checksum is
    recorded in the sidecar. On any exception (``KeyboardInterrupt`` included) the writer processes
    are stopped and the temporary file removed; stale temporary files of ``output`` left by a killed
    ``prepare`` are removed first (see ``remove_stale_temp_files``).

    Example::

        write_beton("data/imagenet/train", "data/imagenet/train.beton", max_resolution=512,
                    write_mode="proportion", compress_probability=0.5, jpeg_quality=90)
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    output = Path(output)
    if output.suffix != ".beton":
        raise ValueError(f"the output file should end in .beton, got {str(output)!r}")
    if write_mode not in WRITE_MODES:
        raise ValueError(f"--write-mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"--max-resolution must be >= 1, got {max_resolution}")
    remove_stale_temp_files(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{str(output)!r} exists; pass --overwrite to replace it")
    dataset = open_source(source, split, seed, limit, allow_empty_classes)

    options = {
        "write_mode": write_mode,
        "max_resolution": max_resolution,
        "compress_probability": compress_probability,
        "jpeg_quality": jpeg_quality,
    }
    fields = {
        "image": RGBImageField(
            write_mode=write_mode,
            max_resolution=max_resolution,
            compress_probability=compress_probability,
            jpeg_quality=jpeg_quality,
        ),
        "label": IntField(),
    }
    start = time.time()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beton_path(output)  # holds this host and pid: a later prepare can tell a stale one
    error_log = Path(str(tmp) + ".errors")
    dataset.error_log = str(error_log)
    writer = None
    try:
        try:
            with stoppable_writer():
                writer = DatasetWriter(str(tmp), fields, num_workers=num_workers)
                writer.from_indexed_dataset(dataset, chunksize=chunksize)  # shows a progress bar
        except BaseException:
            free_shared_memory(writer)
            raise
        bad = error_log.read_text().splitlines() if error_log.exists() else []
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"{len(bad)} source image(s) cannot be read, nothing written: " + "; ".join(bad[:3]) + more)
        info = {
            "format": SIDECAR_FORMAT,
            "version": 2,
            "num_samples": len(dataset),
            "num_classes": len(dataset.classes),
            "classes": list(dataset.classes),
            "fields": ["image", "label"],
            "file_size": tmp.stat().st_size,
            "checksum": file_checksum(tmp, CHECKSUM),
            "source": os.path.basename(os.path.normpath(source)) if source != "quickstart" else "quickstart",
            "split": split if source == "quickstart" else None,
            "write_options": options,
            "seconds": round(time.time() - start, 2),
        }
        atomic_write_text(sidecar_path(output), json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, output)
    finally:
        error_log.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return info


def free_shared_memory(writer: Any) -> None:
    """Release the metadata shared memory of an interrupted ffcv ``DatasetWriter`` (if it made one)."""
    from multiprocessing import shared_memory

    sm = getattr(writer, "metadata_sm", None)
    if isinstance(sm, shared_memory.SharedMemory):
        for release in (sm.close, sm.unlink):
            with contextlib.suppress(Exception):  # already released, or views still exported
                release()


# ----------------------------------------------------------------------------- checking
def check_beton(
    path: str | os.PathLike, num_classes: int | None = None, verify_checksum: bool | None = None
) -> dict[str, Any]:
    """Check an FFCV file against its sidecar before any loader reads it; return the sidecar.

    Fails with a message naming the file when it is missing, has no or an incomplete sidecar, is
    truncated (size differs from the recorded one), cannot be parsed, lacks the image/label
    fields, holds labels outside ``[0, num_classes)``, disagrees with ``num_classes``, or (last,
    the costly check) differs from the checksum its sidecar records: ``verify_checksum`` None
    checks files up to ``VERIFY_MAX_BYTES``, True always, False never. A sidecar without a
    checksum (an older ``prepare``) skips that check with a warning.
    """
    require_ffcv()
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FFCV file {str(path)!r} does not exist (write it with `mrl-vision prepare`)")
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no sidecar {side.name!r}: it was not written by `mrl-vision prepare` "
            "or its writing did not finish; prepare it again"
        )
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"sidecar {str(side)!r} is not valid JSON ({e})") from None
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing or info.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"sidecar {str(side)!r} lacks the fields {missing or ['format']}; prepare the file again")
    size = path.stat().st_size
    if size != info["file_size"]:
        raise ValueError(
            f"FFCV file {str(path)!r} is {size} bytes but was written as {info['file_size']} bytes: "
            "it is truncated or was modified; prepare it again"
        )
    try:
        reader = Reader(str(path))
    except Exception as e:  # ffcv raises assorted numpy/assert errors on a corrupt header
        raise ValueError(f"FFCV file {str(path)!r} cannot be read ({type(e).__name__}: {e}); prepare it again") from None
    names = list(reader.field_names)
    if names[:2] != ["image", "label"]:
        raise ValueError(f"FFCV file {str(path)!r} has fields {names}, expected ['image', 'label']")
    if int(reader.num_samples) != info["num_samples"]:
        raise ValueError(
            f"FFCV file {str(path)!r} holds {int(reader.num_samples)} samples, its sidecar says {info['num_samples']}"
        )
    n_classes = len(info["classes"])
    if num_classes is not None and num_classes != n_classes:
        raise ValueError(
            f"FFCV file {str(path)!r} has {n_classes} classes but the data module expects num_classes={num_classes}"
        )
    labels = reader.metadata["f1"]
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(labels[(labels < 0) | (labels >= n_classes)][0])
        raise ValueError(f"FFCV file {str(path)!r} holds label {bad}, outside [0, {n_classes})")
    if verify_checksum or (verify_checksum is None and size <= VERIFY_MAX_BYTES):
        verify_beton_checksum(path, info)
    return info


def verify_beton_checksum(path: str | os.PathLike, info: dict[str, Any]) -> bool:
    """Compare ``path`` with the checksum in its sidecar ``info``: ``ValueError`` naming the file when
    they differ; a warning and False when the sidecar has none; True when they match."""
    recorded = info.get("checksum")
    if not recorded:
        warnings.warn(f"{str(path)!r}: its sidecar has no checksum (written by an older `mrl-vision prepare`); "
                      "contents not verified", stacklevel=3)
        return False
    algorithm = str(recorded).split(":", 1)[0]
    if algorithm not in hashlib.algorithms_available:
        raise ValueError(f"sidecar of {str(path)!r} records a checksum in an unknown algorithm {algorithm!r}")
    if file_checksum(path, algorithm) != recorded:
        raise ValueError(
            f"FFCV file {str(path)!r} differs from what `mrl-vision prepare` wrote (its {algorithm} checksum does "
            "not match the sidecar's): it was modified or corrupted in place; prepare it again"
        )
    return True

