"""Writing FFCV ``.beton`` files, and checking them before a loader touches them.

``mrl-vision prepare SOURCE OUTPUT.beton`` turns an image folder tree (``SOURCE/<class>/*.jpg``) or
the built-in ``quickstart`` digits into one FFCV file with an ``image`` and a ``label`` field. The
file is written under a temporary name in the output folder and renamed when complete; a sidecar
``OUTPUT.beton.json`` records the sample count, the class names in label order, the file size and
the write options, so a data module can tell a complete file from a truncated or foreign one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..files import atomic_path, atomic_write_text

SIDECAR_FORMAT = "mrl-vision-beton"
SIDECAR_KEYS = ("format", "num_samples", "classes", "file_size", "fields")
WRITE_MODES = ("raw", "jpg", "proportion", "smart")
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
    """``root/<class>/<image>`` as (PIL RGB image, label) pairs, optionally ``limit`` per class."""

    def __init__(self, root: str | os.PathLike, limit: int | None = None) -> None:
        from .imagefolder import scan_split

        self.classes, samples = scan_split(Path(root))
        if limit is not None:
            samples = [samples[i] for i in first_per_class([t for _, t in samples], limit)]
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    error_log: str | None = None  # set by write_beton: where workers record unreadable images

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except Exception as e:  # noqa: BLE001 - a dead FFCV writer process would hang the parent
            if self.error_log is None:
                raise
            with open(self.error_log, "a") as log:  # one short line: an atomic append
                log.write(f"{path}: {type(e).__name__}: {e}\n")
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
) -> dict[str, Any]:
    """Write ``source`` (a folder tree or ``"quickstart"``) to ``output`` and its sidecar; return the sidecar.

    Options follow FFCV's ImageNet recipe: ``write_mode`` raw (decoded pixels), jpg, proportion
    (JPEG with probability ``compress_probability``) or smart; ``max_resolution`` caps the longer
    side; ``jpeg_quality`` for compressed images. ``split`` and ``seed`` apply to ``quickstart``.

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
    if output.exists() and not overwrite:
        raise FileExistsError(f"{str(output)!r} exists; pass --overwrite to replace it")
    if source == "quickstart":
        dataset = QuickstartSource(split, seed=seed, limit=limit)
    elif Path(source).is_dir():
        dataset = FolderSource(source, limit=limit)
    else:
        raise FileNotFoundError(
            f"source {source!r} is neither an image folder (SOURCE/<class>/<image>) nor 'quickstart'"
        )
    if len(dataset) == 0:
        raise ValueError(f"source {source!r} has no samples to write")

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
    with atomic_path(output) as tmp:
        error_log = Path(str(tmp) + ".errors")
        dataset.error_log = str(error_log)
        try:
            writer = DatasetWriter(str(tmp), fields, num_workers=num_workers)
            writer.from_indexed_dataset(dataset, chunksize=chunksize)  # shows a progress bar
            bad = error_log.read_text().splitlines() if error_log.exists() else []
        finally:
            error_log.unlink(missing_ok=True)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"{len(bad)} source image(s) cannot be read, nothing written: " + "; ".join(bad[:3]) + more)
        info = {
            "format": SIDECAR_FORMAT,
            "version": 1,
            "num_samples": len(dataset),
            "num_classes": len(dataset.classes),
            "classes": list(dataset.classes),
            "fields": ["image", "label"],
            "file_size": tmp.stat().st_size,
            "source": os.path.basename(os.path.normpath(source)) if source != "quickstart" else "quickstart",
            "split": split if source == "quickstart" else None,
            "write_options": options,
            "seconds": round(time.time() - start, 2),
        }
        atomic_write_text(sidecar_path(output), json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------- checking
def check_beton(path: str | os.PathLike, num_classes: int | None = None) -> dict[str, Any]:
    """Check an FFCV file against its sidecar before any loader reads it; return the sidecar.

    Fails with a message naming the file when it is missing, has no or an incomplete sidecar, is
    truncated (size differs from the recorded one), cannot be parsed, lacks the image/label
    fields, holds labels outside ``[0, num_classes)``, or disagrees with ``num_classes``.
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
    return info

