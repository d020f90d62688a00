"""``StreamingDataModule``: training from litdata chunk folders on local disk or object storage (``s3://``).

Data path: ``mrl-vision prepare SOURCE OUT_DIR --format litdata`` writes a folder of chunks (see
``chunks.py``); this module checks each split's folder when built (its index and sidecar, fetched
from the store for a URL) and streams it with Lightning's litdata:

- training: a ``StreamingDataset`` (chunks fetched ahead into ``cache_dir``, shuffled chunk-wise then
  item-wise with ``seed + epoch``, split between ranks and loader workers by litdata itself) read by
  a ``StreamingDataLoader``, whose position Lightning saves in checkpoints, so a run resumed from a
  mid-epoch checkpoint continues with the samples it had not seen;
- evaluation (validation, test, predict, probes, embeddings): the same folder read by index, in the
  written order, through the unpadded shards of every mrl-vision module (rank ``r`` of ``W`` reads
  samples ``r, r + W, ...``), so per-size metrics under DDP equal those of one process.

Images are decoded, cropped and flipped in the loader workers. Under a Trainer on an accelerator the
batches stay ``uint8`` until the device and are normalised there, in the Trainer's precision;
on the CPU (and outside a Trainer) the workers normalise.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .base import MatryoshkaDataModule, precision_dtype, require_at_least
from .chunks import check_chunks, check_location, decode_image, require_litdata
from .transforms import IMAGENET_MEAN, IMAGENET_STD, check_views, eval_transform, multi_view, train_transform

require_litdata()
from litdata import StreamingDataLoader, StreamingDataset  # noqa: E402


def allow_plain_http(storage_options: dict[str, Any] | None) -> None:
    """Stream through boto3 when the store's endpoint is plain ``http://`` (MinIO or another S3-compatible
    store without TLS on a local network): litdata 0.2.76 downloads chunks with obstore, which refuses
    plain HTTP (a ``BadScheme`` error in every loader worker), unless it is switched off for this process."""
    endpoint = str((storage_options or {}).get("endpoint_url") or "")
    if endpoint.startswith("http://"):
        from litdata.streaming import downloader

        if hasattr(downloader, "_OBSTORE_AVAILABLE"):
            downloader._OBSTORE_AVAILABLE = False


class StreamedImages(StreamingDataset):
    """A litdata ``StreamingDataset`` of ``{"image": bytes, "label": int}`` items yielding
    ``(transform(image), label)``: decoded and augmented in the loader worker that reads it."""

    def __init__(self, input_dir: str, transform, **kwargs: Any) -> None:
        super().__init__(input_dir, **kwargs)
        self.image_transform = transform

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return self.image_transform(decode_image(item["image"])), int(item["label"])


class ResumableLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose restored position serves one pass only.

    litdata clears its ``restore`` flag when a pass runs to its end; Lightning ends a resumed epoch
    after the batches it still expects, without exhausting the pass, so the next epoch would replay
    the restored position (and yield nothing). Here a pass that started from a restored position
    clears it for the next one."""

    _restored_pass_started = False

    def __iter__(self):
        if self._restored_pass_started:
            self.restore, self._restored_pass_started = False, False
        restoring = bool(self.restore)
        for batch in super().__iter__():
            self._restored_pass_started = self._restored_pass_started or restoring
            yield batch


class IndexedImages(Dataset):
    """A chunk folder read by sample index (map-style), in the written order: ``(transform(image), label)``.

    Each process (each loader worker) opens its own ``StreamingDataset`` on first use; a sample's
    chunk is fetched into the cache when first read."""

    def __init__(self, location: str, num_samples: int, transform, **stream_kwargs: Any) -> None:
        self.location, self.num_samples, self.transform, self.stream_kwargs = location, num_samples, transform, stream_kwargs
        self._stream: StreamingDataset | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} is outside the {self.num_samples} samples of {self.location!r}")
        if self._stream is None:
            self._stream = StreamingDataset(self.location, shuffle=False, **self.stream_kwargs)
        item = self._stream[int(i)]
        return self.transform(decode_image(item["image"])), int(item["label"])

    def __getstate__(self) -> dict[str, Any]:  # workers open their own stream
        return {**self.__dict__, "_stream": None}


class StreamingDataModule(MatryoshkaDataModule):
    """litdata streaming of chunk folders written by ``mrl-vision prepare SOURCE OUT_DIR --format litdata``.

    For data past one machine's disk and for many nodes: every rank streams its share from the
    store, caching chunks locally. On one node with a local disk ``FFCVDataModule`` is faster.

    Args:
        train_path / val_path / test_path / predict_path: chunk folders, local or ``s3://BUCKET/PREFIX``
            (``test_path`` defaults to ``val_path``, ``predict_path`` to ``test_path``).
        image_size: training RandomResizedCrop side.
        eval_image_size / eval_crop_ratio: evaluation: resize the short side to
            ``eval_image_size / eval_crop_ratio``, center crop ``eval_image_size`` (224/256 as for ImageNet).
        batch_size: per device (the global batch is ``batch_size x devices x num_nodes``);
            ``eval_batch_size`` defaults to it.
        num_workers: loader worker processes per device (decoding and augmentation).
        shuffle / seed: shuffle the training stream, chunk-wise then within chunks, with ``seed + epoch``
            (the same on every rank, so shards do not overlap).
        drop_last: drop the last incomplete training batch. Under DDP litdata always evens out the ranks'
            shares (every rank must take the same number of steps), dropping the few samples that do not divide.
        hflip / rrc_scale / rrc_ratio: training flip and RandomResizedCrop's area and aspect ranges.
        auto_augment: ``"rand-m9-n2"`` (RandAugment), ``"trivial"`` (TrivialAugmentWide) or None, per image in
            the workers (:mod:`mrl_vision.data.augment`).
        views: training samples are this many independent augmentations of each image (``[N, V, 3, H, W]``),
            for ``model.embedding_loss`` (SimCLR, supervised contrastive).
        mean / std: normalisation in [0, 1] units.
        num_classes: expected class count, checked against the folders' sidecars (default: theirs).
        cache_dir / max_cache_size: where streamed chunks are kept and how much disk they may take (litdata's
            defaults: its cache folder, 75 % of the free disk); local folders are read in place.
        storage_options: boto3 client options for ``s3://`` (``endpoint_url``, ``region_name``, keys, ...).
        normalize_on_device: send ``uint8`` batches and normalise after the transfer (default: when the
            Trainer runs on an accelerator), else normalise in the workers.
        pin_memory: pin the batches' host memory (when CUDA is available).

    Example::

        dm = StreamingDataModule("s3://my-bucket/imagenet/train", "s3://my-bucket/imagenet/val",
                                 image_size=176, eval_image_size=224, batch_size=256, num_workers=8,
                                 cache_dir="/local/nvme/cache", max_cache_size="200GB")
        dm.num_classes  # from the sidecar: 1000
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        image_size: int = 224,
        eval_image_size: int = 224,
        eval_crop_ratio: float = 224 / 256,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        hflip: bool = True,
        rrc_scale: Sequence[float] = (0.08, 1.0),
        rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
        auto_augment: str | None = None,
        views: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_classes: int | None = None,
        cache_dir: str | None = None,
        max_cache_size: int | str | None = None,
        storage_options: dict[str, Any] | None = None,
        normalize_on_device: bool | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.views = check_views(views)
        require_at_least(1, batch_size=batch_size, image_size=image_size, eval_image_size=eval_image_size)
        require_at_least(0, num_workers=num_workers)
        if eval_batch_size is not None:
            require_at_least(1, eval_batch_size=eval_batch_size)
        if not 0.0 < eval_crop_ratio <= 1.0:
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {eval_crop_ratio}")
        mean, std = [float(v) for v in mean], [float(v) for v in std]  # hparams: YAML lists
        train_transform(image_size, mean, std, scale=tuple(rrc_scale), ratio=tuple(rrc_ratio), auto_augment=auto_augment,
                        normalize=False)  # checks the augmentation options now
        self.save_hyperparameters(ignore=["num_classes", "storage_options"])  # no credentials in hparams.yaml
        self.storage_options = storage_options
        allow_plain_http(storage_options)
        test_path = test_path or val_path
        paths = {"train": train_path, "val": val_path, "test": test_path, "predict": predict_path or test_path}
        self.paths = {k: check_location(p) if p else None for k, p in paths.items()}
        given = {k: p for k, p in self.paths.items() if p}
        if not given:
            raise ValueError("StreamingDataModule needs at least one of train_path, val_path, test_path")
        self.info = {p: check_chunks(p, num_classes, storage_options) for p in dict.fromkeys(given.values())}
        classes = {tuple(i["classes"]) for i in self.info.values()}
        if len(classes) > 1:
            raise ValueError(f"the litdata folders disagree on their classes: {sorted(set(given.values()))}")
        self.class_names = list(next(iter(classes)))
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.input_size, self.mean, self.std = eval_image_size, mean, std
        self.drop_last_train = drop_last
        self._train_loader: ResumableLoader | None = None
        self._resume_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ datasets
    def _path(self, split: str) -> str:
        self._check_split(split, allow_predict=True)
        path = self.paths[split]
        if not path:
            raise ValueError(f"no litdata folder for the {split} split: set {split}_path")
        return path

    def _uint8(self) -> bool:
        """Whether batches stay ``uint8`` until ``on_after_batch_transfer`` (only under a Trainer, which calls it)."""
        if not self._trainer_attached():
            return False
        if self.hparams.normalize_on_device is not None:
            return bool(self.hparams.normalize_on_device)
        return self.trainer.strategy.root_device.type != "cpu"

    def _stream_options(self) -> dict[str, Any]:
        hp = self.hparams
        return {"cache_dir": hp.cache_dir, "max_cache_size": hp.max_cache_size, "storage_options": self.storage_options}

    def _train_transform(self):
        hp = self.hparams
        crop = train_transform(hp.image_size, hp.mean, hp.std, scale=tuple(hp.rrc_scale), ratio=tuple(hp.rrc_ratio),
                               hflip=0.5 if hp.hflip else 0.0, auto_augment=hp.auto_augment, normalize=not self._uint8())
        return multi_view(crop, self.views)

    def _eval_transform(self):
        hp = self.hparams
        return eval_transform(hp.eval_image_size, hp.eval_crop_ratio, hp.mean, hp.std, normalize=not self._uint8())

    def num_samples(self, split: str) -> int:
        """How many samples ``split``'s folder holds (from its sidecar)."""
        return int(self.info[self._path(split)]["num_samples"])

    def dataset(self, split: str, evaluate: bool | None = None) -> IndexedImages:
        """``split`` read by index in the written order, with the evaluation transform unless it is the
        training split (``evaluate`` overrides): what evaluation, probes and embeddings read."""
        path = self._path(split)
        evaluate = split != "train" if evaluate is None else evaluate
        transform = self._eval_transform() if evaluate else self._train_transform()
        return IndexedImages(path, self.num_samples(split), transform, **self._stream_options())

    def predict_dataset(self) -> IndexedImages:
        return self.dataset("predict", evaluate=True)

    # ------------------------------------------------------------------ training stream
    def train_dataloader(self) -> ResumableLoader:
        """The training stream: a ``StreamingDataLoader`` (its position is saved in checkpoints)."""
        hp = self.hparams
        path = self._path("train")
        world = self.trainer.world_size if self._trainer_attached() else 1
        share = self.num_samples("train") // world
        if (hp.drop_last or world > 1) and share < hp.batch_size:
            raise ValueError(
                f"batch_size={hp.batch_size} is larger than the {self.num_samples('train')} training samples"
                f"{f' shared by {world} devices' if world > 1 else ''}: the last incomplete training batch is "
                "dropped, so training would run no step (lower batch_size)"
            )
        dataset = StreamedImages(path, self._train_transform(), shuffle=hp.shuffle, seed=hp.seed,
                                 drop_last=hp.drop_last or world > 1, **self._stream_options())
        loader = ResumableLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers,
                                 pin_memory=self.pin_memory and torch.cuda.is_available())
        if self._resume_state is not None:  # a resumed run: continue the checkpoint's epoch where it stopped
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    # ------------------------------------------------------------------ checkpoints
    # The training stream's position is saved with the data module's state: Lightning restores that before
    # the loader is built, whereas its own copy of the loader's state (the fit loop's) is dropped when the
    # task sizes its LR schedule with ``trainer.estimated_stepping_batches`` (Lightning issue #20550).
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = state_dict.get("train_loader")

    def _loader(self, dataset, train: bool = False, batch_size: int | None = None, shard: bool = True):
        return super()._loader(dataset, train=train, batch_size=batch_size or self.hparams.eval_batch_size, shard=shard)

    # ------------------------------------------------------------------ on the device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, rest = (batch, []) if torch.is_tensor(batch) else (batch[0], list(batch[1:]))
        if torch.is_tensor(images) and images.dtype == torch.uint8:
            dtype = precision_dtype(self.trainer.precision) if self._trainer_attached() else torch.float32
            images = self.normalize(images, dtype)
        return images if torch.is_tensor(batch) else [images, *rest]
