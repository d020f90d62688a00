"""Writing litdata chunk folders, and checking them before a loader streams them.

``mrl-vision prepare SOURCE OUT_DIR --format litdata`` turns an image folder tree
(``SOURCE/<class>/*.jpg``) or the built-in ``quickstart`` digits into a folder of litdata chunks
(``litdata.optimize``): one item per image, ``{"image": encoded bytes, "label": int}``, in the
source's order. Image files are stored as they are (JPEG stays the same JPEG), after a full decode
proves them readable; ``max_resolution`` re-encodes larger ones as JPEG; the digits are stored as
PNG. Beside litdata's ``index.json`` the folder holds ``mrl_vision.json``, the same facts as the
FFCV writer's sidecar (sample count, classes in label order, write options) and the SHA-256 of
``index.json``, so a reader can tell a complete folder of ours from a foreign or replaced index.

The folder is written under a temporary name beside ``OUT_DIR`` (``.NAME.HOST.pidPID.RANDOM.tmp``)
and renamed when complete: an interrupted ``prepare`` leaves no ``OUT_DIR``, and the next
``prepare`` of the same target removes a temporary folder whose writer was killed.

``StreamingDataModule`` reads these folders from local disk or from ``s3://`` (uploaded as they
are, e.g. ``aws s3 sync OUT_DIR s3://bucket/OUT_DIR``).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..files import atomic_write_text

CHUNKS_FORMAT = "mrl-vision-litdata"
SIDECAR_NAME = "mrl_vision.json"
INDEX_NAME = "index.json"
REMOTE_SCHEMES = ("s3",)
LITDATA_INSTALL_HINT = "litdata is not installed: pip install 'mrl-vision[streaming]' (or pip install litdata)"


def require_litdata() -> None:
    """Raise ``ImportError`` with the one-line install instruction when litdata is missing."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no network call to PyPI at import
    try:
        import litdata  # noqa: F401
    except ImportError as e:
        raise ImportError(LITDATA_INSTALL_HINT) from e


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an object-store URL (``scheme://...``) rather than a local folder."""
    return "://" in str(path)


def check_location(path: str | os.PathLike) -> str:
    """``path`` as a string: a local folder, or a URL of a supported object store (``s3://bucket/prefix``);
    ``ValueError`` naming any other URL."""
    path = str(path)
    if is_remote(path):
        url = urlparse(path)
        if url.scheme not in REMOTE_SCHEMES or not url.netloc:
            raise ValueError(f"cannot stream from {path!r}: give a local folder or an s3://BUCKET/PREFIX URL")
        return path.rstrip("/")
    return path


# ----------------------------------------------------------------------------- writing
class EncodeSample:
    """Item ``i`` of a prepare source as ``{"image": bytes, "label": int}`` (litdata's ``fn``).

    Folder images are decoded in full (so a broken file fails here, named) and stored as their own
    bytes, unless ``max_resolution`` caps their longer side (then resized and stored as JPEG of
    ``jpeg_quality``); in-memory arrays (the digits) are stored as PNG. An unreadable image is
    written to ``error_log`` (one line) and replaced by a placeholder, so the writer finishes and
    ``write_chunks`` can fail listing every bad file.
    """

    def __init__(self, source, max_resolution: int | None, jpeg_quality: int, error_log: str) -> None:
        self.source, self.max_resolution, self.jpeg_quality, self.error_log = source, max_resolution, jpeg_quality, error_log

    def __call__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        from .imagefolder import read_image

        samples = getattr(self.source, "samples", None)
        if samples is None:  # in-memory arrays
            pixels, label = self.source[i]
            return {"image": self._encode(Image.fromarray(pixels), "PNG"), "label": int(label)}
        path, label = samples[i]
        try:
            image = read_image(path)
        except ValueError as e:  # names the file
            with open(self.error_log, "a") as log:  # one short line: an atomic append
                log.write(f"{e}\n")
            return {"image": self._encode(Image.new("RGB", (8, 8)), "PNG"), "label": int(label)}
        if self.max_resolution is not None and max(image.size) > self.max_resolution:
            scale = self.max_resolution / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            return {"image": self._encode(image.resize(size, Image.Resampling.LANCZOS), "JPEG"), "label": int(label)}
        return {"image": Path(path).read_bytes(), "label": int(label)}

    def _encode(self, image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": self.jpeg_quality} if fmt == "JPEG" else {}))
        return buf.getvalue()


def temp_dir_path(output: Path) -> Path:
    """A new empty temporary folder beside ``output``: ``.NAME.HOST.pidPID.RANDOM.tmp``."""
    from .beton import _host

    return Path(tempfile.mkdtemp(prefix=f".{output.name}.{_host()}.pid{os.getpid()}.", suffix=".tmp", dir=output.parent))


def write_chunks(
    source: str,
    output: str | os.PathLike,
    split: str = "train",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    num_workers: int = -1,
    limit: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    allow_empty_classes: bool = False,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Write ``source`` (a folder tree or ``"quickstart"``) to the litdata folder ``output``; return its sidecar.

    ``split`` and ``seed`` pick the quickstart split; ``limit`` keeps the first images of each class;
    ``chunk_bytes`` is litdata's chunk size (64 MB: large enough for object stores, small enough that
    a shuffle mixes chunks). Written under a temporary name and renamed when complete; on any
    exception (``KeyboardInterrupt`` included) the temporary folder is removed.

    Example::

        write_chunks("data/imagenette/train", "data/imagenette-litdata/train", max_resolution=256)
    """
    require_litdata()
    import litdata

    from .beton import open_source, remove_stale_temp_files

    if is_remote(output):
        raise ValueError(f"--format litdata writes a local folder, got {str(output)!r}: write it here, then upload "
                         "it as it is (aws s3 sync OUT_DIR s3://BUCKET/PREFIX)")
    output = Path(output)
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"--max-resolution must be >= 1, got {max_resolution}")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{str(output)!r} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{str(output)!r} is a file, not a litdata folder; remove it first")
    if output.is_dir() and any(output.iterdir()) and not (output / SIDECAR_NAME).is_file():
        raise FileExistsError(f"{str(output)!r} holds files that mrl-vision did not write; --overwrite replaces "
                              "only folders written by `mrl-vision prepare --format litdata`")
    dataset = open_source(source, split, seed, limit, allow_empty_classes)
    workers = (os.cpu_count() or 1) if num_workers in (-1, 0, None) else int(num_workers)
    start = time.time()
    tmp = temp_dir_path(output)  # holds this host and pid: a later prepare can tell a stale one
    error_log = Path(str(tmp) + ".errors")
    try:
        litdata.optimize(
            fn=EncodeSample(dataset, max_resolution, jpeg_quality, str(error_log)),
            inputs=list(range(len(dataset))),
            output_dir=str(tmp),
            chunk_bytes=chunk_bytes,
            num_workers=max(1, min(workers, len(dataset))),
            keep_data_ordered=True,  # item i is source sample i: sample names and evaluation order follow the source
            mode="overwrite",  # the temporary folder exists (empty)
            start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,  # no re-import
            verbose=False,
        )
        bad = error_log.read_text().splitlines() if error_log.exists() else []
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"{len(bad)} source image(s) cannot be read, nothing written: " + "; ".join(bad[:3]) + more)
        index = json.loads((tmp / INDEX_NAME).read_text())
        written = sum(int(c["chunk_size"]) for c in index["chunks"])
        if written != len(dataset):
            raise RuntimeError(f"litdata wrote {written} of the {len(dataset)} samples of {source!r}; nothing written")
        info = {
            "format": CHUNKS_FORMAT,
            "version": 1,
            "num_samples": len(dataset),
            "num_classes": len(dataset.classes),
            "classes": list(dataset.classes),
            "fields": ["image", "label"],
            "index_checksum": "sha256:" + hashlib.sha256((tmp / INDEX_NAME).read_bytes()).hexdigest(),
            "data_bytes": sum(int(c["chunk_bytes"]) for c in index["chunks"]),
            "source": os.path.basename(os.path.normpath(source)) if source != "quickstart" else "quickstart",
            "split": split if source == "quickstart" else None,
            "write_options": {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "chunk_bytes": chunk_bytes},
            "seconds": round(time.time() - start, 2),
        }
        atomic_write_text(tmp / SIDECAR_NAME, json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
        if output.exists():  # --overwrite: our own folder (checked above); moved aside, then removed
            old = temp_dir_path(output)
            os.replace(output, old / output.name)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        error_log.unlink(missing_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


# ----------------------------------------------------------------------------- checking
def _read_remote(url: str, names: tuple[str, ...], storage_options: dict | None) -> dict[str, bytes | None]:
    """The files ``names`` of the folder ``url`` (``s3://bucket/prefix``), ``None`` for each that does not
    exist; ``ValueError`` naming the URL when the store cannot be reached (a few seconds, not litdata's
    thousand retries)."""
    import boto3
    import botocore.config
    import botocore.exceptions

    parsed = urlparse(url)
    options = dict(storage_options or {})
    config = botocore.config.Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    if "config" in options:
        config = options.pop("config").merge(config)
    try:
        client = boto3.client("s3", config=config, **options)
    except Exception as e:
        raise ValueError(f"cannot open {url!r}: {type(e).__name__}: {e}") from None
    found: dict[str, bytes | None] = {}
    for name in names:
        key = f"{parsed.path.strip('/')}/{name}".lstrip("/")
        try:
            found[name] = client.get_object(Bucket=parsed.netloc, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                found[name] = None
                continue
            raise ValueError(f"cannot read {url}/{name}: {code or type(e).__name__}: {e}") from None
        except Exception as e:  # no connection, no credentials, ...
            raise ValueError(f"cannot read {url}/{name}: {type(e).__name__}: {e}") from None
    return found


def check_chunks(path: str | os.PathLike, num_classes: int | None = None,
                 storage_options: dict | None = None) -> dict[str, Any]:
    """Check a litdata folder written by ``mrl-vision prepare --format litdata`` before any loader reads
    it (local, or ``s3://`` through ``storage_options``, boto3's client options); return its sidecar.

    Fails naming the folder when it does not exist or cannot be reached, has no ``index.json`` or no
    sidecar, when ``index.json`` is not the one written with the sidecar (another dataset's index,
    or a dataset written by another tool), lacks the image and label fields, or its sample count or
    class count disagrees with the sidecar or with ``num_classes``.
    """
    location = check_location(path)
    hint = " (write it with `mrl-vision prepare SOURCE OUT_DIR --format litdata`)"
    if is_remote(location):
        files = _read_remote(location, (INDEX_NAME, SIDECAR_NAME), storage_options)
    else:
        folder = Path(location)
        if folder.is_file():
            raise NotADirectoryError(f"litdata folder {location!r} is a file, not a folder{hint}")
        if not folder.is_dir():
            raise FileNotFoundError(f"litdata folder {location!r} does not exist{hint}")
        files = {n: (folder / n).read_bytes() if (folder / n).is_file() else None for n in (INDEX_NAME, SIDECAR_NAME)}
    if files[INDEX_NAME] is None:
        raise FileNotFoundError(f"{location!r} has no {INDEX_NAME}: it is not a litdata dataset{hint}")
    if files[SIDECAR_NAME] is None:
        raise FileNotFoundError(f"{location!r} has no {SIDECAR_NAME}: it was not written by `mrl-vision prepare "
                                "--format litdata`, or its writing did not finish; prepare it again")
    try:
        info = json.loads(files[SIDECAR_NAME])
        index = json.loads(files[INDEX_NAME])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{location!r}: {INDEX_NAME} or {SIDECAR_NAME} is not valid JSON ({e}); prepare it again") from None
    if not isinstance(info, dict) or info.get("format") != CHUNKS_FORMAT or "classes" not in info:
        raise ValueError(f"{location}/{SIDECAR_NAME} is not an mrl-vision litdata sidecar; prepare the folder again")
    digest = "sha256:" + hashlib.sha256(files[INDEX_NAME]).hexdigest()
    if digest != info.get("index_checksum"):
        raise ValueError(f"{location}/{INDEX_NAME} is not the index that `mrl-vision prepare` wrote with its sidecar "
                         "(a foreign or replaced index, or a folder merged with another): prepare it again")
    types = (index.get("config") or {}).get("types") or {}
    if types.get("image") != "bytes" or types.get("label") != "int":
        raise ValueError(f"{location}/{INDEX_NAME} has the fields {types}, expected image: bytes and label: int")
    count = sum(int(c.get("chunk_size", 0)) for c in index.get("chunks", []))
    if count != info.get("num_samples"):
        raise ValueError(f"{location!r} holds {count} samples, its sidecar says {info.get('num_samples')}")
    n_classes = len(info["classes"])
    if num_classes is not None and num_classes != n_classes:
        raise ValueError(f"litdata folder {location!r} has {n_classes} classes but the data module expects "
                         f"num_classes={num_classes}")
    return info


def decode_image(data: bytes):
    """Encoded image bytes (an item's ``image``) as an 8-bit RGB PIL image, as ``read_image`` reads files."""
    from PIL import Image

    from .imagefolder import to_rgb8

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb8(image)
