"""``MatryoshkaDataModule``: the interface every data module shares, and the loader hooks of
map-style data (image folders, the quickstart digits) written once."""

from __future__ import annotations

import math
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .sampler import eval_sampler


def check_labels(target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, num_classes)``.

    Called on CPU batches before they move to the accelerator, so a bad label is a clear
    message instead of a device-side assert inside cross-entropy.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {target.dtype}")
    if target.numel() == 0:
        return
    bad = (target < 0) | (target >= num_classes)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"label {value} is outside [0, {num_classes}): the model has num_classes={num_classes} "
            "(check the dataset's labels or the model's num_classes)"
        )


def check_subset(subset: Sequence[int], size: int, split: str) -> list[int]:
    """``subset`` as a list of ints, each a sample index of a split of ``size`` samples; ``ValueError``
    naming the first that is not."""
    indices = [int(i) for i in subset]
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(f"subset index {bad[0]} is outside the {split} split's {size} samples")
    return indices


def precision_dtype(precision: str | int | None) -> torch.dtype:
    """The input dtype that matches a Trainer precision setting (``bf16-mixed`` -> bfloat16)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16") or p == "half":
        return torch.float16
    if p.startswith("64"):
        return torch.float64
    return torch.float32


def require_at_least(minimum: int, **values: int) -> None:
    """Raise ``ValueError`` naming the first of ``values`` (arguments by name) below ``minimum``."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


class MatryoshkaDataModule(L.LightningDataModule):
    """What every mrl-vision data module has: the class names (label order), the model's input
    size, the normalisation of its images, an evaluation loader of any split, and the label check
    of CPU batches before they reach the accelerator.

    A new data module sets ``class_names``, ``input_size``, ``mean``, ``std`` (attributes or
    properties), ``batch_size`` and ``num_workers``, and provides ``dataset(split, evaluate=None)``
    (a map-style dataset of ``train``, ``val`` or ``test``); the base builds every loader from it.
    ``predict`` runs on the test split unless ``predict_dataset`` says otherwise, and a module that
    can name its samples (file paths) overrides ``sample_names``.
    A module with its own loaders (``FFCVDataModule``) overrides the ``*_dataloader`` hooks and
    ``eval_dataloader`` instead; one that can change its training crop between epochs sets
    ``resizable = True`` and overrides ``set_train_resolution``.

    Example::

        class Pixels(MatryoshkaDataModule):
            class_names, input_size, mean, std = ["a", "b"], 8, [0.5] * 3, [0.25] * 3
            batch_size, num_workers = 4, 0

            def dataset(self, split, evaluate=None):
                return TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 2)

        dm = Pixels()
        dm.num_classes                       # 2
        x, y = next(iter(dm.eval_dataloader("val")))
    """

    class_names: list[str]
    """Class names in label order."""
    input_size: int
    """Side of the square image the model gets at inference."""
    mean: list[float]
    """Per-channel mean of the normalisation the data applies, in [0, 1] units."""
    std: list[float]
    """Per-channel standard deviation of that normalisation, in [0, 1] units."""
    batch_size: int
    num_workers: int

    resizable: bool = False
    """Whether ``set_train_resolution`` works (``ProgressiveResizing`` needs it)."""
    splits: tuple[str, ...] = ("train", "val", "test")
    drop_last_train: bool = False
    """Drop the last incomplete training batch."""
    pin_memory: bool = False
    """Pin host memory of the batches (when CUDA is available)."""
    open_set: bool = False
    """Whether the evaluation splits are labelled by classes of their own (retrieval on unseen classes)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def classes(self) -> list[str]:
        """The class names (an alias of ``class_names``)."""
        return self.class_names

    def set_train_resolution(self, size: int) -> None:
        """Change the training crop size from the next epoch (only where ``resizable``)."""
        raise TypeError(f"{type(self).__name__} cannot change its training resolution; use FFCVDataModule")

    def dataset(self, split: str, evaluate: bool | None = None) -> Dataset:
        """The dataset of ``split``, augmented when it is ``train`` unless ``evaluate=True``."""
        raise TypeError(f"{type(self).__name__} has no map-style dataset(); it must override its loader hooks")

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def _training(self) -> bool:
        return self._trainer_attached() and bool(self.trainer.training)

    def _check_split(self, split: str, allow_predict: bool = False) -> None:
        # ``predict`` (what predict_dataloader reads) is a split of eval_dataloader only
        splits = (*self.splits, "predict") if allow_predict and "predict" not in self.splits else self.splits
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; choose {', '.join(splits[:-1])} or {splits[-1]}")

    def num_samples(self, split: str) -> int:
        """How many samples ``split`` holds (``predict``: what ``predict_dataloader`` reads)."""
        self._check_split(split, allow_predict=True)
        return len(self.predict_dataset() if split == "predict" else self.dataset(split, evaluate=True))

    def predict_dataset(self) -> Dataset:
        """What ``predict`` runs on: the test split, unless a module has its own images to predict."""
        return self.dataset("test", evaluate=True)

    def sample_names(self, split: str) -> list[str] | None:
        """An identifier of each sample of ``split`` (``train``, ``val``, ``test`` or ``predict``: what
        ``predict_dataloader`` reads), in dataset order, for writing predictions; ``None`` where a module
        has none (in-memory data)."""
        return None

    def _loader(self, dataset: Dataset, train: bool = False, batch_size: int | None = None, shard: bool = True) -> DataLoader:
        # Under DDP, Lightning shards training with its DistributedSampler; evaluation uses
        # unpadded shards (``shard``) so that every sample counts once.
        batch_size = batch_size or self.batch_size
        devices = self.trainer.world_size if self._trainer_attached() else 1
        if train and self.drop_last_train and math.ceil(len(dataset) / devices) < batch_size:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {len(dataset)} training samples"
                f"{f' shared by {devices} devices' if devices > 1 else ''}: the last incomplete training batch "
                "is dropped, so training would run no step (lower batch_size)"
            )
        trainer = self.trainer if shard and not train and self._trainer_attached() else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=eval_sampler(dataset, trainer),
            drop_last=train and self.drop_last_train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train", evaluate=False), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val", evaluate=True))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test", evaluate=True))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset())

    def eval_dataloader(self, split: str, batch_size: int | None = None, shard: bool = False,
                        subset: Sequence[int] | None = None) -> DataLoader:
        """``split`` (``train``, ``val``, ``test``, or ``predict``: what ``predict_dataloader`` reads) with
        the evaluation transforms, in order (features for linear probes, embeddings). Unsharded unless
        ``shard``: then, under DDP with a trainer attached, rank ``r`` of ``W`` reads samples
        ``r, r + W, r + 2W, ...`` (unpadded). ``subset``: only these sample indices, in this order
        (sharded the same way over the list)."""
        self._check_split(split, allow_predict=True)
        dataset = self.predict_dataset() if split == "predict" else self.dataset(split, evaluate=True)
        if subset is not None:
            dataset = Subset(dataset, check_subset(subset, len(dataset), split))
        return self._loader(dataset, batch_size=batch_size, shard=shard)

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``uint8 [..., 3, H, W]`` -> normalised ``dtype`` (by ``mean`` and ``std``), on the images' device and
        memory format: the modules that send ``uint8`` to the accelerator normalise there with it."""
        key = (images.device, dtype)
        cache = self.__dict__.setdefault("_norm_cache", {})
        if key not in cache:  # once per device and dtype: a host-to-device copy every step would sync the GPU
            mean, std = torch.tensor(self.mean) * 255, torch.tensor(self.std) * 255
            cache[key] = (mean.to(images.device, dtype).view(-1, 1, 1), std.to(images.device, dtype).view(-1, 1, 1))
        mean, std = cache[key]
        return (images.to(dtype) - mean) / std

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # checks (images, labels) pairs; a batch of images alone (unlabeled predict data) passes as it is
        # (open-set evaluation splits carry labels of their own classes, from their folders)
        if isinstance(batch, (list, tuple)) and len(batch) >= 2 and torch.is_tensor(batch[1]):
            if batch[1].device.type == "cpu" and not (self.open_set and not self._training()):
                check_labels(batch[1], self.num_classes)
        return batch
