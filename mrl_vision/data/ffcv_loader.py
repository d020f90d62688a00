"""``FFCVDataModule``: ImageNet-style training from FFCV ``.beton`` files at speed.

Data path: ``mrl-vision prepare`` writes ``train.beton``/``val.beton`` (see ``beton.py``); this
module checks them against their sidecars when built, and creates one FFCV ``Loader`` per split
inside the ``*_dataloader()`` hooks (so under DDP the process group exists and each rank reads
its own shard with ``distributed=True``).

Pipelines: images are decoded, cropped and flipped on the CPU by JIT-compiled FFCV operations.
Training crops and flips are seeded (``ffcv_ops``): drawn from (``seed``, epoch, sample index),
so a seeded run sees the same batches on every run, whatever the number of loader threads; the
epoch is the Trainer's (a resumed run continues the sequence) and the order is FFCV's ``RANDOM``
with the same seed (``seed + epoch``).
On a GPU the ``uint8`` NCHW batch (channels-last strides) is copied non-blocking by FFCV's
``ToDevice`` and normalised in torch on the device, in the Trainer's precision (no cupy needed).
On the CPU FFCV's JIT ``NormalizeImage`` normalises to float32 in the loader threads, into buffers
FFCV reuses. All JIT operations come before the torch ones: on the CPU, alternating them makes
FFCV's pipeline grouping loop forever.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from .base import MatryoshkaDataModule, check_subset, precision_dtype, require_at_least  # noqa: F401 (re-exported)
from .beton import check_beton, require_ffcv
from .transforms import IMAGENET_MEAN, IMAGENET_STD, check_views

ORDERS = ("random", "quasi_random", "sequential")


def view_seed(seed: int, view: int) -> int:
    """The seed of training view ``view`` (0: ``seed`` itself), so that each view draws its own crops and flips."""
    return (int(seed) + 1_000_003 * int(view)) % (2**31)


class FFCVDataModule(MatryoshkaDataModule):
    """FFCV loaders for ``.beton`` files written by ``mrl-vision prepare``.

    Args:
        train_path / val_path / test_path / predict_path: ``.beton`` files (``test_path`` defaults
            to ``val_path``, ``predict_path`` to ``test_path``).
        image_size: training RandomResizedCrop output side (``ProgressiveResizing`` changes it
            between epochs).
        eval_image_size / eval_crop_ratio: evaluation center crop: the central ``eval_crop_ratio``
            of the short side, resized to ``eval_image_size`` (the reference: 256 px, 224/256).
        batch_size: per device (the global batch is ``batch_size x devices x num_nodes``);
            ``eval_batch_size`` defaults to it.
        num_workers: FFCV decoding threads per process (capped at the available cores).
        os_cache: let the OS page cache hold the file (best when it fits in RAM); otherwise FFCV's
            own process cache reads pages on demand.
        batches_ahead: batches prepared ahead of the training step.
        order: ``random`` (works with DDP), ``quasi_random`` (faster when the file does not fit in
            RAM; single process only) or ``sequential``. Evaluation is always sequential.
        drop_last: drop the last incomplete training batch.
        hflip: random horizontal flip for training (off for data like digits).
        rrc_scale / rrc_ratio: RandomResizedCrop's area and aspect ranges.
        mean / std: normalisation in [0, 1] units.
        num_classes: expected class count, checked against the files' sidecars (default: theirs).
        verify_checksum: compare each file with the SHA-256 checksum its sidecar records (bytes
            changed in place): None (default) for files up to ``VERIFY_MAX_BYTES`` (2 GiB, about
            2 s), True always, False never.
        distributed: shard with ``distributed=True``; default: when the Trainer has more than one process.
        auto_augment / random_erasing: training augmentation per image (:mod:`mrl_vision.data.augment`):
            ``"rand-m9-n2"`` (RandAugment), ``"trivial"`` (TrivialAugmentWide) or None; the probability of
            erasing a rectangle with noise after normalisation. FFCV's compiled pipeline cannot run them, so
            training batches then stay ``uint8`` until the device, where :class:`~mrl_vision.data.augment.BatchAugment`
            applies them image by image (drawn from torch's seeded generator, not from the sample index).
        seed: seed of the training order and augmentation (the same on every rank, so shards do not
            overlap): epoch ``e`` shuffles with ``seed + e``, and each sample's crop and flip are a
            function of (``seed``, ``e``, its index in the file), independent of threads and ranks.
        views: training samples are this many independent crops and flips of each image (``[N, V, 3, H, W]``
            after transfer): 2 for SimCLR's NT-Xent or supervised contrastive learning (``model.embedding_loss``).
            Each view is one more FFCV pipeline on the image field, with its own seed (:func:`view_seed`).

    Example::

        dm = FFCVDataModule("data/imagenet/train.beton", "data/imagenet/val.beton",
                            image_size=160, eval_image_size=256, batch_size=512)
        dm.num_classes  # from the sidecar: 1000
    """

    resizable = True

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        image_size: int = 224,
        eval_image_size: int = 224,
        eval_crop_ratio: float = 224 / 256,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        os_cache: bool = True,
        batches_ahead: int = 3,
        order: Literal["random", "quasi_random", "sequential"] = "random",
        drop_last: bool = True,
        hflip: bool = True,
        rrc_scale: Sequence[float] = (0.08, 1.0),
        rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_classes: int | None = None,
        distributed: bool | None = None,
        seed: int = 0,
        verify_checksum: bool | None = None,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        views: int = 1,
    ) -> None:
        super().__init__()
        require_ffcv()
        self.views = check_views(views)
        from .augment import BatchAugment

        self.batch_augment = BatchAugment(auto_augment, random_erasing)  # checks both before any file is read
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if order == "quasi_random" and distributed:
            raise ValueError("order='quasi_random' does not work with distributed=True; use order='random'")
        require_at_least(1, batch_size=batch_size, image_size=image_size, eval_image_size=eval_image_size,
                         num_workers=num_workers, batches_ahead=batches_ahead)
        if not 0.0 < eval_crop_ratio <= 1.0:
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {eval_crop_ratio}")
        mean, std = [float(v) for v in mean], [float(v) for v in std]  # hparams: YAML lists
        self.save_hyperparameters(ignore=["num_classes"])  # the model logs the real num_classes
        test_path = test_path or val_path
        self.paths = {"train": train_path, "val": val_path, "test": test_path, "predict": predict_path or test_path}
        given = {k: p for k, p in self.paths.items() if p}
        if not given:
            raise ValueError("FFCVDataModule needs at least one of train_path, val_path, test_path")
        self.info = {p: check_beton(p, num_classes, verify_checksum) for p in set(given.values())}
        classes = {tuple(i["classes"]) for i in self.info.values()}
        if len(classes) > 1:
            raise ValueError(f"the FFCV files disagree on their classes: {sorted(given.values())}")
        self.class_names = list(next(iter(classes)))
        self.image_size = image_size  # of training (ProgressiveResizing changes it)
        self.input_size, self.mean, self.std = eval_image_size, mean, std
        self._warned_workers = False
        self._decoders: list[Any] = []  # training RandomResizedCrop decoders (resized between epochs)
        self._mean = torch.tensor(mean) * 255
        self._std = torch.tensor(std) * 255

    # ------------------------------------------------------------------ resolution
    def set_train_resolution(self, size: int) -> None:
        """Change the training crop size; takes effect at the next epoch (the next ``iter``)."""
        if size < 1:
            raise ValueError(f"resolution must be >= 1, got {size}")
        self.image_size = size
        for dec in self._decoders:
            dec.output_size = (size, size)

    # ------------------------------------------------------------------ loaders
    def _device(self) -> torch.device:
        trainer = self.trainer if self._trainer_attached() else None
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _distributed(self) -> bool:
        if self.hparams.distributed is not None:
            return self.hparams.distributed
        return self._trainer_attached() and self.trainer.world_size > 1

    def workers(self) -> int:
        """``num_workers``, capped at the cores this process may use (FFCV's numba threads fail
        beyond them), so one config serves a 2-core laptop and a 96-core server."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.hparams.num_workers > cores and not self._warned_workers:
            rank_zero_info(f"FFCVDataModule: num_workers={self.hparams.num_workers} capped at the {cores} available cores")
            self._warned_workers = True
        return max(1, min(self.hparams.num_workers, cores))

    def make_loader(self, split: str, augment: bool = True, batch_size: int | None = None, shard: bool | None = None,
                    subset: Sequence[int] | None = None):
        """The FFCV ``Loader`` of ``split`` (``train``, ``val``, ``test`` or ``predict``); the training
        split is augmented and shuffled unless ``augment=False`` (then read as for evaluation);
        ``batch_size`` overrides the configured one. ``shard`` applies to loaders read as for
        evaluation: True gives rank ``r`` of ``W`` the samples ``r, r + W, ...`` when the trainer runs
        several processes, False the whole split on every rank, None (the evaluation hooks) shards
        whenever the module is distributed. ``subset`` (evaluation only): read these sample indices
        only, in this order (sharded over the list)."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

        from .ffcv_ops import SeededLoader, SeededRandomHorizontalFlip, SeededRandomResizedCropRGBImageDecoder

        hp = self.hparams
        path = self.paths[split]
        if not path:
            raise ValueError(f"no FFCV file for the {split} split: set {split}_path")
        train = split == "train" and augment
        distributed = self._distributed()
        if train and hp.order == "quasi_random" and distributed:
            raise ValueError("order='quasi_random' does not work under DDP (distributed=True); use order='random'")
        label = [IntDecoder(), ToTensor(), Squeeze(1)]  # dim 1 only: a batch of one stays [1]
        device = self._device()

        def image_pipeline(view: int = 0) -> list:
            if train:  # seeded: crops and flips from (seed, epoch, sample index); SeededLoader sets the epoch
                seed = view_seed(hp.seed, view)
                decoder = SeededRandomResizedCropRGBImageDecoder(
                    (self.image_size, self.image_size), scale=tuple(hp.rrc_scale), ratio=tuple(hp.rrc_ratio), seed=seed
                )
                self._decoders.append(decoder)
                ops = [decoder] + ([SeededRandomHorizontalFlip(seed=seed)] if hp.hflip else [])
            else:
                ops = [CenterCropRGBImageDecoder((hp.eval_image_size, hp.eval_image_size), ratio=hp.eval_crop_ratio)]
            if device.type != "cuda" and not (train and self.batch_augment.active):
                # On the CPU, normalise in FFCV's JIT op: it runs in the loader threads, ahead of the
                # step, into buffers FFCV reuses (a torch op per batch would allocate fresh memory).
                ops.append(NormalizeImage(self._mean.numpy(), self._std.numpy(), np.float32))
            ops.append(ToTensor())  # every JIT op above, every torch op below
            if device.type == "cuda":  # uint8 crosses the bus; normalised on the GPU
                ops.append(ToDevice(device, non_blocking=True))
            ops.append(ToTorchImage(channels_last=True))
            return ops

        image = image_pipeline()
        if device.type == "cuda":
            label.append(ToDevice(device, non_blocking=True))
        pipelines: dict[str, Any] = {"image": image, "label": label}
        for view in range(1, self.views if train else 1):  # more outputs of the same field: (image, label, image_1, ...)
            ops = image_pipeline(view)
            pipelines[f"image_{view}"] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:])
        order = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}.get(hp.order, OrderOption.SEQUENTIAL)
        indices = None
        if subset is not None:
            if train:
                raise ValueError("subset applies to loaders read as for evaluation (augment=False)")
            indices = np.asarray(check_subset(subset, self.info[path]["num_samples"], split), dtype=np.int64)
        if shard is not None and not train:
            distributed = shard and self._trainer_attached() and self.trainer.world_size > 1
        if not train and distributed:
            # FFCV's distributed sequential order pads shards with repeated samples; a strided
            # subset per rank instead counts every sample once (rank r: r, r + W, r + 2W, ...).
            world, rank = self.trainer.world_size, self.trainer.global_rank
            everything = np.arange(self.info[path]["num_samples"]) if indices is None else indices
            indices = everything[rank::world]
            distributed = False
        return (SeededLoader if train else Loader)(
            str(path),
            indices=indices,
            batch_size=batch_size or (hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)),
            num_workers=self.workers(),
            os_cache=hp.os_cache,
            order=order if train else OrderOption.SEQUENTIAL,
            distributed=distributed,
            seed=hp.seed,
            drop_last=hp.drop_last if train else False,
            batches_ahead=hp.batches_ahead,
            pipelines=pipelines,
        )

    def train_dataloader(self) -> "LazyEpochs":
        return LazyEpochs(self.make_loader("train"), self._trainer_epoch)

    def _trainer_epoch(self) -> int | None:
        """The Trainer's current epoch (the seeded order and augmentation of a resumed run continue)."""
        return self.trainer.current_epoch if self._trainer_attached() else None

    def val_dataloader(self):
        return self.make_loader("val")

    def test_dataloader(self):
        return self.make_loader("test")

    def predict_dataloader(self):
        return self.make_loader("predict")

    def num_samples(self, split: str) -> int:
        """How many samples ``split``'s file holds (from its sidecar)."""
        self._check_split(split, allow_predict=True)
        path = self.paths[split]
        if not path:
            raise ValueError(f"no FFCV file for the {split} split: set {split}_path")
        return int(self.info[path]["num_samples"])

    def eval_dataloader(self, split: str, batch_size: int | None = None, shard: bool = False,
                        subset: Sequence[int] | None = None):
        """``split`` (``train``, ``val``, ``test`` or ``predict``) read as for evaluation (center crop, in
        order): features for linear probes, embeddings. Unsharded unless ``shard`` (then strided
        per-rank subsets under DDP, as the evaluation hooks read); ``subset``: only these sample
        indices, in this order."""
        self._check_split(split, allow_predict=True)
        return self.make_loader(split, augment=False, batch_size=batch_size, shard=shard, subset=subset)

    # ------------------------------------------------------------------ on the device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, *rest = batch
        views = [images]
        if self.views > 1 and len(rest) == self.views:  # a training batch of views: (image, label, image_1, ...)
            views += rest[1:]
            rest = rest[:1]
        training = self._trainer_attached() and self.trainer.training
        dtype = precision_dtype(self.trainer.precision) if self._trainer_attached() else torch.float32
        for i, view in enumerate(views):
            if view.dtype == torch.uint8:
                if self.batch_augment.active and training:
                    views[i] = self.batch_augment(view, lambda im: self.normalize(im, dtype))
                else:
                    views[i] = self.normalize(view, dtype)
        images = views[0] if len(views) == 1 else torch.stack(views, 1)  # [N, V, 3, H, W] (a copy)
        # FFCV reuses its output buffers for later batches: labels kept past this step must be copies.
        return [images, *(t.clone() if torch.is_tensor(t) else t for t in rest)]


class LazyEpochs:
    """An FFCV training ``Loader`` whose epoch starts at its first batch, not at ``iter()``.

    Lightning calls ``iter()`` on the training loader early (while estimating the number of steps,
    before a resumed run's epoch is restored, and before ``on_train_epoch_start``); FFCV's
    ``Loader`` would start decoding at that moment, with the resolution of that moment. Deferring
    the start lets ``ProgressiveResizing`` set every epoch's size, the first one included. With a
    length, Lightning does not prefetch a batch at ``iter()``. ``epoch`` (a callable, e.g. the
    Trainer's current epoch; ``None`` from it keeps FFCV's own count) sets the epoch each pass
    starts at, which seeds the order and the seeded augmentation.
    """

    def __init__(self, loader, epoch: Callable[[], int | None] | None = None) -> None:
        self.loader = loader
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        epoch = self.epoch() if self.epoch is not None else None
        if epoch is not None:
            self.loader.next_epoch = int(epoch)
        yield from self.loader
