"""ImageFolder data module: users' own ``root/{train,val}/<class>/*.jpg`` trees through torchvision.

The fallback data path (the fast one is FFCV). Classes are the sub-folders of ``train``, sorted;
their order defines the labels, and ``val``/``test`` must use the same class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from .base import MatryoshkaDataModule, require_at_least
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


def scan_split(directory: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and ``(path, label)`` samples of one split, with clear errors for missing,
    empty or mismatched folders. ``class_to_idx`` (from the training split) fixes the labels."""
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {str(directory)!r} does not exist")
    try:
        classes, own = find_classes(str(directory))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data directory {str(directory)!r} has no class sub-folders (expected {directory}/<class>/<image>)"
        ) from None
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ValueError(
                f"{str(directory)!r} has classes that the training split lacks: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}"
            )
        own = {c: class_to_idx[c] for c in classes}
    samples = make_dataset(str(directory), own, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(
            f"data directory {str(directory)!r} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) "
            "in its class sub-folders"
        )
    return classes, samples


class FolderDataset(Dataset):
    """``(path, label)`` samples read with PIL and transformed."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return self.transform(default_loader(path)), target


class ImageFolderDataModule(MatryoshkaDataModule):
    """Image folders through torchvision: RandomResizedCrop + flip for training, resize + center
    crop (ratio ``eval_crop_ratio``, 224/256 as for ImageNet) for evaluation.

    Args:
        root: folder holding the splits.
        train_dir / val_dir / test_dir: split sub-folders (``test_dir`` defaults to ``val_dir``,
            as ImageNet has no public test labels).
        image_size: training crop and evaluation crop side.
        batch_size: per device (the global batch is ``batch_size x devices x num_nodes``).
        num_workers: DataLoader workers per device.

    The folders are checked when the module is built, so a missing or empty directory fails
    before any model is created.

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
    ) -> None:
        super().__init__()
        require_at_least(1, batch_size=batch_size, image_size=image_size)
        mean, std = [float(v) for v in mean], [float(v) for v in std]  # hparams: YAML lists
        self.save_hyperparameters()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {root!r} does not exist")
        train_path = self.root / train_dir
        ref = train_path if train_path.is_dir() else self.root / val_dir
        self.class_names, samples = scan_split(ref)
        self.class_to_idx = {c: i for i, c in enumerate(self.class_names)}
        self.split_dirs = {"train": train_path, "val": self.root / val_dir, "test": self.root / (test_dir or val_dir)}
        self._samples = {ref: samples}  # scanned once per folder
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.input_size, self.mean, self.std = image_size, mean, std
        self.train_tf = train_transform(image_size, mean, std, scale=tuple(rrc_scale), hflip=hflip)
        self.eval_tf = eval_transform(image_size, eval_crop_ratio, mean, std)

    def dataset(self, split: str, evaluate: bool | None = None) -> FolderDataset:
        """The dataset of ``train``, ``val`` or ``test`` (checked when first asked for), with the
        evaluation transform unless it is the training split (``evaluate`` overrides)."""
        self._check_split(split)
        path = self.split_dirs[split]
        if path not in self._samples:
            self._samples[path] = scan_split(path, self.class_to_idx)[1]
        evaluate = split != "train" if evaluate is None else evaluate
        return FolderDataset(self._samples[path], self.eval_tf if evaluate else self.train_tf)
