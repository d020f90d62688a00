"""ImageFolder data module: users' own ``root/{train,val}/<class>/*.jpg`` trees through torchvision.

The fallback data path (the fast one is FFCV). Classes are the sub-folders of ``train``, sorted;
their order defines the labels, and ``val``/``test`` must use the same class names. Hidden folders
and files (``.ipynb_checkpoints``, ``.DS_Store``, ...) are ignored. Every image is read by
``read_image`` (also by ``mrl-vision prepare``): fully decoded, 16-bit data scaled to 8 bits.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .base import MatryoshkaDataModule, require_at_least
from .transforms import IMAGENET_MEAN, IMAGENET_STD, check_views, eval_transform, multi_view, train_transform

Sample = tuple[str, int]
IMAGE_TYPES = f"({', '.join(IMG_EXTENSIONS[:4])}, ...)"  # for messages


def preview(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` of ``items`` as a list, and how many more there are."""
    return f"{list(items[:n])}{f' and {len(items) - n} more' if len(items) > n else ''}"


def require_dir(path: Path, what: str, hint: str = "") -> None:
    """Raise ``FileNotFoundError`` (``NotADirectoryError`` for a file) naming ``path`` unless it is a folder."""
    if path.is_file():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a folder{hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{hint}")


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit grey (modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) is scaled to
    ``round(value / 257)``, where PIL's ``convert`` clips it to white; other modes (grey + alpha,
    palette, CMYK, ...) convert as in PIL."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((grey + 128) // 257).astype(np.uint8))  # exact rounding: v / 257 has no ties
    return image.convert("RGB")


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path``, decoded completely, as 8-bit RGB (``to_rgb8``).

    Raises ``ValueError`` naming the file when it cannot be opened or decoded (missing, truncated, corrupt).

    Example::

        read_image("data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG").size  # (500, 375)
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode all now: a truncated file fails here, not half-way through an epoch
            return to_rgb8(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on broken files
        raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def unreadable_images(paths: Sequence[str]) -> list[str]:
    """The files of ``paths`` that ``read_image`` cannot read, in order (decoded in threads: PIL
    releases the GIL while decoding)."""

    def fails(path: str) -> bool:
        try:
            read_image(path)
        except ValueError:
            return True
        return False

    with ThreadPoolExecutor() as pool:
        return [p for p, bad in zip(paths, pool.map(fails, paths)) if bad]


def image_files(folder: Path) -> list[str]:
    """The image files in ``folder`` and its sub-folders, sorted by path; hidden files and folders ignored."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [(parent, f) for f in files if not f.startswith(".") and has_file_allowed_extension(f, IMG_EXTENSIONS)]
    return [os.path.join(parent, f) for parent, f in sorted(found)]


def scan_split(
    directory: Path, class_to_idx: dict[str, int] | None = None, allow_empty_classes: bool = False
) -> tuple[list[str], list[Sample]]:
    """Classes and ``(path, label)`` samples of one split, with clear errors for missing,
    empty or mismatched folders. ``class_to_idx`` (from the training split) fixes the labels;
    without it the split's own class folders, sorted, do, and each must hold an image unless
    ``allow_empty_classes``. Hidden folders and files are ignored."""
    require_dir(directory, "data directory")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(
            f"data directory {str(directory)!r} has no class sub-folders (expected {directory}/<class>/<image>)"
        )
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ValueError(f"{str(directory)!r} has classes that the training split lacks: {preview(unknown)}")
    labels = class_to_idx if class_to_idx is not None else {c: i for i, c in enumerate(classes)}
    files = {c: image_files(directory / c) for c in classes}
    samples = [(path, labels[c]) for c in classes for path in files[c]]
    if not samples:
        raise FileNotFoundError(
            f"data directory {str(directory)!r} holds no images {IMAGE_TYPES} in its class sub-folders"
        )
    empty = [c for c in classes if not files[c]]
    if empty and class_to_idx is None and not allow_empty_classes:
        raise ValueError(
            f"class folders with no images: {preview(empty, 20)} in {str(directory)!r} "
            "(remove them or pass allow_empty_classes=True)"
        )
    return classes, samples


def hold_out(samples: list[Sample], fraction: float, seed: int, base: Path) -> tuple[list[Sample], list[Sample]]:
    """``samples`` split into (kept, held out), both in order. Of each class of ``n`` images,
    ``round(fraction * n)`` are held out, at least 1 and at most ``n - 1`` (none of a single image),
    chosen by a hash of ``seed`` and their path relative to ``base``: the same split on every run
    and machine."""
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)

    def rank(path: str) -> bytes:
        return hashlib.sha256(f"{seed}:{Path(os.path.relpath(path, base)).as_posix()}".encode()).digest()

    held = set()
    for paths in by_class.values():
        k = min(max(round(fraction * len(paths)), 1), len(paths) - 1)
        held.update(sorted(paths, key=rank)[:k])
    return [s for s in samples if s[0] not in held], [s for s in samples if s[0] in held]


class FolderDataset(Dataset):
    """``(path, label)`` samples read with ``read_image`` and transformed: ``(image, label)`` items,
    or images alone unless ``labelled`` (unlabeled images to predict)."""

    def __init__(self, samples: list[Sample], transform, labelled: bool = True) -> None:
        self.samples, self.transform, self.labelled = samples, transform, labelled
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | torch.Tensor:
        path, target = self.samples[i]
        image = self.transform(read_image(path))
        return (image, target) if self.labelled else image


class ImageFolderDataModule(MatryoshkaDataModule):
    """Image folders through torchvision: RandomResizedCrop + flip for training, resize + center
    crop (ratio ``eval_crop_ratio``, 224/256 as for ImageNet) for evaluation.

    Args:
        root: folder holding the splits.
        train_dir / val_dir / test_dir: split sub-folders (``test_dir`` defaults to ``val_dir``,
            as ImageNet has no public test labels).
        image_size: training crop and evaluation crop side.
        batch_size: per device (the global batch is ``batch_size x devices x num_nodes``); at most
            the training images per device, as the last incomplete training batch is dropped.
        num_workers: DataLoader workers per device.
        val_fraction: hold out this fraction of each class of ``train_dir`` as the validation split
            (``hold_out``: seeded by ``split_seed``, disjoint from training), and as the test split
            when there is neither ``test_dir`` nor ``val_dir``. Needed when ``val_dir`` is missing.
        allow_empty_classes: keep class folders of ``train_dir`` that hold no image as classes.
        verify_images: decode every image of every split when the module is built, and fail
            listing the unreadable ones.
        skip_unreadable: verify, and leave the unreadable images out (``skipped`` lists them by split).
        predict_dir: a folder of unlabeled images (no class sub-folders) that ``predict`` runs on,
            in name order, with the evaluation transform; its batches are images alone.
        auto_augment / random_erasing: training augmentation per image (:mod:`mrl_vision.data.augment`):
            ``"rand-m9-n2"`` (RandAugment), ``"trivial"`` (TrivialAugmentWide) or None; the probability of
            erasing a rectangle with noise after normalisation (e.g. 0.25).
        views: training samples are this many independent augmentations of each image, ``[V, 3, H, W]``
            (2 for SimCLR's NT-Xent or supervised contrastive learning: ``model.embedding_loss``).
        color_jitter / grayscale: SimCLR's colour distortion (:func:`mrl_vision.data.transforms.train_transform`):
            jitter strength (SimCLR: 1.0 on ImageNet, 0.5 on small images) and grey-scale probability (0.2).
        open_set: the validation and test splits hold classes of their own (the deep-metric-learning protocol:
            train on some classes, retrieve among unseen ones), each split labelled by its own class folders,
            sorted (``split_class_names``); ``class_names`` stay the training split's. For embedders
            (``head: none``), whose evaluation is retrieval within the split.

    The folders are checked when the module is built, so a missing or empty directory fails
    before any model is created. ``sample_names(split)`` names each sample's file.

    Example::

        dm = ImageFolderDataModule("data/imagenet", image_size=224, batch_size=256)
        dm.num_classes  # 1000
    """

    drop_last_train = True

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        eval_crop_ratio: float = 224 / 256,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        rrc_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        pin_memory: bool = True,
        val_fraction: float | None = None,
        split_seed: int = 0,
        allow_empty_classes: bool = False,
        verify_images: bool = False,
        skip_unreadable: bool = False,
        predict_dir: str | None = None,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        views: int = 1,
        color_jitter: float = 0.0,
        grayscale: float = 0.0,
        open_set: bool = False,
    ) -> None:
        super().__init__()
        require_at_least(1, batch_size=batch_size, image_size=image_size)
        self.views = check_views(views)
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        mean, std = [float(v) for v in mean], [float(v) for v in std]  # hparams: YAML lists
        self.save_hyperparameters()
        self.root = Path(root)
        require_dir(self.root, "data root")
        train_path, val_path = self.root / train_dir, self.root / val_dir
        self.split_dirs = {"train": train_path, "val": val_path, "test": self.root / (test_dir or val_dir)}
        self.predict_dir = None if predict_dir is None else Path(predict_dir)
        if self.predict_dir is not None:
            self.split_dirs["predict"] = self.predict_dir
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.input_size, self.mean, self.std = image_size, mean, std
        self.train_tf = multi_view(train_transform(image_size, mean, std, scale=tuple(rrc_scale), hflip=hflip,
                                                   auto_augment=auto_augment, random_erasing=random_erasing,
                                                   color_jitter=color_jitter, grayscale=grayscale), views)
        self.eval_tf = eval_transform(image_size, eval_crop_ratio, mean, std)
        self.skipped: dict[str, list[str]] = {}
        """The unreadable images left out (``skip_unreadable``), by split."""
        self._split_classes: dict[str, list[str]] = {}
        self.open_set = bool(open_set)
        if open_set and val_fraction is not None:
            raise ValueError(f"open_set=True evaluates on classes of their own, but val_fraction={val_fraction} holds "
                             "out images of the training classes: give val_dir (and test_dir) folders instead")

        ref = "train" if train_path.is_dir() or val_fraction is not None else "val"
        self.class_names, samples = scan_split(self.split_dirs[ref], allow_empty_classes=allow_empty_classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.class_names)}
        if val_fraction is None:
            hint = f" (create it, or pass val_fraction=0.1 to hold out 10% of {str(train_path)!r})"
            require_dir(val_path, "validation split", hint)
        if test_dir is not None:
            require_dir(self.split_dirs["test"], "test split")
        self._samples = {ref: self._readable(ref, samples)}  # scanned once per folder
        if val_fraction is not None:
            train, val = hold_out(self._samples["train"], val_fraction, split_seed, train_path)
            self._samples["train"], self._samples["val"] = train, val
            self.split_dirs["val"] = train_path
            if test_dir is None and not val_path.is_dir():
                self.split_dirs["test"], self._samples["test"] = train_path, self._samples["val"]
        for split, path in self.split_dirs.items():  # every split now when verifying; predict_dir always
            if split == "predict" or ((verify_images or skip_unreadable) and path.is_dir()):
                self._split_samples(split)

    def _readable(self, split: str, samples: list[Sample]) -> list[Sample]:
        """``samples`` checked when verifying: unreadable images fail, or are left out (``skip_unreadable``)."""
        if not (self.hparams.verify_images or self.hparams.skip_unreadable):
            return samples
        bad = unreadable_images([p for p, _ in samples])
        if bad and not self.hparams.skip_unreadable:
            raise ValueError(
                f"{len(bad)} unreadable image(s) in {str(self.split_dirs[split])!r}: {preview(bad)} "
                "(replace or remove them, or pass skip_unreadable=True to leave them out)"
            )
        self.skipped[split] = bad
        if bad:
            rank_zero_warn(f"skipped {len(bad)} unreadable image(s) of the {split} split: {preview(bad)}")
        drop = set(bad)
        return [s for s in samples if s[0] not in drop]

    def _split_samples(self, split: str) -> list[Sample]:
        """The ``(path, label)`` samples of ``split`` (label -1 in ``predict``), scanned once per folder."""
        if split not in self._samples:
            path = self.split_dirs[split]
            same = next((s for s in self._samples if self.split_dirs[s] == path), None)
            if same is not None:
                self._samples[split] = self._samples[same]
                if same in self.skipped:
                    self.skipped[split] = self.skipped[same]
            elif split == "predict":
                require_dir(path, "predict_dir")
                files = image_files(path)
                if not files:
                    raise FileNotFoundError(f"predict_dir {str(path)!r} holds no images {IMAGE_TYPES}")
                self._samples[split] = self._readable(split, [(p, -1) for p in files])
            else:
                own = self.open_set and split != "train"
                classes, samples = scan_split(path, None if own else self.class_to_idx)
                self._split_classes[split] = classes if own else self.class_names
                self._samples[split] = self._readable(split, samples)
        return self._samples[split]

    def split_class_names(self, split: str) -> list[str]:
        """The class of each label of ``split``: the training classes, or with ``open_set`` the split's own."""
        self._check_split(split)
        self._split_samples(split)
        return self._split_classes.get(split, self.class_names)

    def dataset(self, split: str, evaluate: bool | None = None) -> FolderDataset:
        """The dataset of ``train``, ``val`` or ``test`` (checked when first asked for), with the
        evaluation transform unless it is the training split (``evaluate`` overrides)."""
        self._check_split(split)
        evaluate = split != "train" if evaluate is None else evaluate
        return FolderDataset(self._split_samples(split), self.eval_tf if evaluate else self.train_tf)

    def predict_dataset(self) -> Dataset:
        """The images of ``predict_dir`` (images alone, in name order), or else the test split."""
        if self.predict_dir is None:
            return super().predict_dataset()
        return FolderDataset(self._split_samples("predict"), self.eval_tf, labelled=False)

    def sample_names(self, split: str) -> list[str]:
        """Each sample's file relative to ``root`` (to ``predict_dir`` for its images), in dataset order;
        ``predict`` names what ``predict_dataloader`` reads."""
        if split == "predict" and self.predict_dir is None:
            split = "test"
        if split != "predict":
            self._check_split(split)
        base = self.root if split != "predict" else self.predict_dir
        return [Path(os.path.relpath(p, base)).as_posix() for p, _ in self._split_samples(split)]
