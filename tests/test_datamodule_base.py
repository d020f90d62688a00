"""The base data module: the interface every data module shares, and the loaders it builds for
map-style data, on small PNG class folders made here and the real quickstart digits."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from mrl_vision.data import ImageFolderDataModule, MatryoshkaDataModule, QuickstartDataModule
from mrl_vision.data.base import check_labels
from mrl_vision.data.quickstart import MNIST_MEAN, MNIST_STD
from mrl_vision.data.sampler import UnpaddedDistributedSampler
from mrl_vision.data.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = [
    pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
]

PNG_CLASSES = ("owl", "ant", "cat")  # folders sort to ant, cat, owl
TRAIN_PER_CLASS, VAL_PER_CLASS = 5, 3


def grey_of(label: int, i: int) -> int:
    """The grey level of image ``i`` of class ``label`` in a PNG tree."""
    return 20 + 60 * label + 10 * i


def write_png_tree(root: Path) -> Path:
    """``root/{train,val}/<class>/*.png``: constant grey images of odd sizes, whose grey level
    tells their class and index."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, c in enumerate(sorted(PNG_CLASSES)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(18, 30, size=2))
                Image.fromarray(np.full((h, w, 3), grey_of(label, i), np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return write_png_tree(tmp_path_factory.mktemp("pngs"))


@pytest.fixture(scope="module")
def digits() -> QuickstartDataModule:
    return QuickstartDataModule(batch_size=48, image_size=40)


def folders(root: Path, **kwargs) -> ImageFolderDataModule:
    args = dict(image_size=16, eval_crop_ratio=1.0, batch_size=4, num_workers=0)
    return ImageFolderDataModule(str(root), **{**args, **kwargs})


def greys(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[int]:
    """The grey level of each normalised constant image of a batch ``[B, 3, H, W]``."""
    p = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (p.mean((1, 2, 3)) * 255).round().long().tolist()


class Pixels(MatryoshkaDataModule):
    """The smallest data module: the base's docstring example."""

    class_names, input_size, mean, std = ["a", "b"], 8, (0.5,) * 3, (0.25,) * 3
    batch_size, num_workers = 4, 0

    def __init__(self, labels: torch.Tensor | None = None) -> None:
        super().__init__()
        self.labels = torch.arange(10) % 2 if labels is None else labels

    def dataset(self, split, evaluate=None):
        return TensorDataset(torch.randn(len(self.labels), 3, 8, 8), self.labels)


# ----------------------------------------------------------------------------- the interface
def test_every_module_is_a_matryoshka_data_module(pngs, digits):
    """A data module does not derive from MatryoshkaDataModule (or it is not exported)."""
    from mrl_vision.data import ffcv_loader

    assert issubclass(ffcv_loader.FFCVDataModule, MatryoshkaDataModule)
    for dm in (folders(pngs), digits, Pixels()):
        assert isinstance(dm, MatryoshkaDataModule) and isinstance(dm, L.LightningDataModule)
    assert not MatryoshkaDataModule.resizable and not ImageFolderDataModule.resizable
    assert not QuickstartDataModule.resizable and ffcv_loader.FFCVDataModule.resizable


def _check_norm(dm: MatryoshkaDataModule) -> None:
    for v in (dm.mean, dm.std):
        assert isinstance(v, list) and len(v) == 3  # lists, as in hyperparameters and saved models and all(isinstance(f, float) and 0 < f < 1 for f in v)


def test_quickstart_interface(digits):
    """The quickstart's classes, input size or normalisation are not the digits', 40 px and MNIST's."""
    assert digits.class_names == [str(d) for d in range(10)] and digits.num_classes == 10
    assert digits.input_size == 40 and QuickstartDataModule().input_size == 32
    assert digits.mean == list(MNIST_MEAN) and digits.std == list(MNIST_STD)
    _check_norm(digits)


def test_imagefolder_interface(pngs):
    """The image folders' classes, input size or normalisation are not the sorted folders, image_size and mean/std."""
    dm = folders(pngs, image_size=20)
    assert dm.class_names == sorted(PNG_CLASSES) == dm.classes and dm.num_classes == 3
    assert dm.input_size == 20
    assert dm.mean == list(IMAGENET_MEAN) and dm.std == list(IMAGENET_STD)
    dm = folders(pngs, mean=[0.5, 0.5, 0.5], std=(0.2, 0.3, 0.4))
    assert dm.mean == [0.5, 0.5, 0.5] and dm.std == [0.2, 0.3, 0.4]
    _check_norm(dm)
    # the hyperparameters keep YAML lists (the CLI links mean/std to the model's, which must match)
    assert dm.hparams.mean == [0.5, 0.5, 0.5] and folders(pngs).hparams.std == list(IMAGENET_STD)


def test_minimal_subclass_gets_every_loader():
    """A module that provides only dataset() and its attributes lacks a loader or the label check."""
    dm = Pixels()
    assert dm.num_classes == 2
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(),
                   dm.predict_dataloader(), dm.eval_dataloader("train")):
        x, y = next(iter(loader))
        assert x.shape == (4, 3, 8, 8) and len(loader) == 3
    with pytest.raises(TypeError, match="MatryoshkaDataModule has no map-style dataset"):
        MatryoshkaDataModule().dataset("train")


# ----------------------------------------------------------------------------- eval_dataloader
def test_imagefolder_eval_dataloader_in_order(pngs):
    """eval_dataloader('train') is augmented, shuffled, sharded or incomplete."""
    dm = folders(pngs)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # would shard val under DDP
    loader = dm.eval_dataloader("train", batch_size=4)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 4, 3]  # all 15, no drop_last
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (15, 3, 16, 16)
    expected = [(label, i) for label in range(3) for i in range(TRAIN_PER_CLASS)]
    assert y.tolist() == [label for label, _ in expected]
    assert greys(x) == [grey_of(label, i) for label, i in expected]
    x2 = torch.cat([b[0] for b in dm.eval_dataloader("train")])
    assert torch.equal(x, x2)


def test_quickstart_eval_dataloader_in_order(digits):
    """The quickstart's eval_dataloader is augmented, shuffled or not the split in order."""
    ds = digits.dataset("train", evaluate=True)
    loader = digits.eval_dataloader("train", batch_size=1000)
    assert len(loader) == 4 and isinstance(loader.sampler, SequentialSampler)
    x, y = next(iter(loader))
    assert torch.equal(y, digits.datasets["train"].labels[:1000])
    assert x.shape == (1000, 3, 40, 40)
    for i in (0, 1, 999):
        assert torch.equal(x[i], ds[i][0])
    assert torch.equal(next(iter(digits.eval_dataloader("train", batch_size=1000)))[0], x)
    val_x, val_y = next(iter(digits.eval_dataloader("val")))
    assert val_x.shape == (48, 3, 40, 40) and torch.equal(val_y, digits.datasets["val"].labels[:48])


@pytest.mark.parametrize("split", ["predict", "validation", ""])
def test_eval_dataloader_unknown_split(pngs, digits, split):
    """An unknown split is not a ValueError naming it (eval_dataloader also reads ``predict``, dataset does not)."""
    for dm in (folders(pngs), digits):
        if split == "predict":  # what predict_dataloader reads: here the test split
            assert len(dm.eval_dataloader(split).dataset) == len(dm.predict_dataset())
        else:
            with pytest.raises(ValueError, match=f"unknown split {split!r}; choose train, val, test or predict"):
                dm.eval_dataloader(split)
        with pytest.raises(ValueError, match=f"unknown split {split!r}; choose train, val or test"):
            dm.dataset(split)


# ----------------------------------------------------------------------------- the label check
def test_on_before_batch_transfer_names_a_bad_label(pngs):
    """A label outside [0, num_classes) passes the data module's hook, or a good batch is changed."""
    dm = folders(pngs)
    x = torch.zeros(3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 3\)"):
        dm.on_before_batch_transfer([x, torch.tensor([0, 7, 1])], 0)
    with pytest.raises(ValueError, match=r"label -1 is outside \[0, 3\)"):
        dm.on_before_batch_transfer((x, torch.tensor([0, -1, 1])), 0)
    with pytest.raises(ValueError, match="integer class indices"):
        dm.on_before_batch_transfer([x, torch.tensor([0.0, 1.0, 2.0])], 0)
    good = [x, torch.tensor([0, 2, 1])]
    assert dm.on_before_batch_transfer(good, 0) is good
    assert good[1].tolist() == [0, 2, 1]
    other = {"image": x, "label": torch.tensor([9])}  # not a (images, labels) pair: left alone
    assert dm.on_before_batch_transfer(other, 0) is other
    assert dm.on_before_batch_transfer([x, [9]], 0)[1] == [9]
    batch = next(iter(dm.val_dataloader()))
    assert dm.on_before_batch_transfer(batch, 0) is batch


def test_check_labels_lives_in_the_data_package():
    """mrl_vision.data.base.check_labels does not check labels as the model did."""
    check_labels(torch.tensor([0, 9]), 10)
    check_labels(torch.zeros(0, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\): the model has num_classes=10"):
        check_labels(torch.tensor([3, 10, 11]), 10)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.fc(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_stops_at_a_bad_label_through_the_data_module(tmp_path):
    """Lightning does not run the data module's label check before the first step."""
    labels = torch.tensor([0, 5, 5, 5, 1, 5, 5, 5])  # shuffled in batches of 4: a 5 in each
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, 2\)"):
        trainer.fit(_Tiny(), datamodule=Pixels(labels))
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------- resolution
def test_set_train_resolution_needs_a_resizable_module(pngs, digits):
    """A module that cannot resize accepts set_train_resolution or fails with another error."""
    for dm, name in ((digits, "QuickstartDataModule"), (folders(pngs), "ImageFolderDataModule")):
        with pytest.raises(TypeError, match=f"^{name} cannot change its training resolution; use FFCVDataModule$"):
            dm.set_train_resolution(64)


# ----------------------------------------------------------------------------- the loaders
def test_imagefolder_loaders(pngs):
    """The image-folder loaders differ from before: shuffled training without its last incomplete
    batch; val/test/predict in order, complete, unshuffled; pinned memory only with CUDA."""
    dm = folders(pngs, pin_memory=True)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last and len(train) == 15 // 4
    batches = list(train)
    assert len(batches) == 3
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16)
        assert y.dtype == torch.int64 and bool(((y >= 0) & (y < 3)).all())
    assert train.pin_memory == torch.cuda.is_available() and not train.persistent_workers
    assert not folders(pngs, pin_memory=False).train_dataloader().pin_memory
    val_order = [label for label in range(3) for _ in range(VAL_PER_CLASS)]
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
        batches = list(loader)
        assert [len(y) for _, y in batches] == [4, 4, 1]
        assert torch.cat([y for _, y in batches]).tolist() == val_order
        assert greys(torch.cat([x for x, _ in batches])) == [grey_of(lb, i) for lb in range(3) for i in range(VAL_PER_CLASS)]
    assert folders(pngs, num_workers=2).val_dataloader().persistent_workers


def test_quickstart_loaders(digits):
    """The quickstart loaders differ from before: shuffled training keeping its last batch,
    val/test/predict in order, float [B, 3, S, S] images and int64 labels."""
    train = digits.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and not train.drop_last
    assert len(train) == math.ceil(4000 / 48) and not train.pin_memory and not train.persistent_workers
    x, y = next(iter(train))
    assert x.dtype == torch.float32 and x.shape == (48, 3, 40, 40) and y.dtype == torch.int64
    for loader in (digits.val_dataloader(), digits.test_dataloader(), digits.predict_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler) and len(loader) == math.ceil(500 / 48)
    assert digits.predict_dataloader().dataset is digits.test_dataloader().dataset is digits.datasets["test"]
    ys = torch.cat([y for _, y in digits.val_dataloader()])
    assert torch.equal(ys, digits.datasets["val"].labels)
    assert QuickstartDataModule(num_workers=1).val_dataloader().persistent_workers


def test_quickstart_sets_up_lazily():
    """A quickstart module outside a Trainer (no setup call) has no loaders."""
    dm = QuickstartDataModule(batch_size=10, augment=False)
    assert dm.trainer is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 3, 32, 32)
    # without augmentation the training split is read with the evaluation transform
    assert dm.dataset("train").transform is dm.dataset("val").transform


def test_evaluation_is_sharded_without_padding_under_ddp(pngs, digits):
    """Under DDP val/test/predict are not the unpadded shards, or training gets one."""
    for dm, n in ((folders(pngs), 9), (QuickstartDataModule(batch_size=48), 500)):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
        assert not isinstance(dm.train_dataloader().sampler, UnpaddedDistributedSampler)
        for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
            assert isinstance(loader.sampler, UnpaddedDistributedSampler)
            assert list(loader.sampler) == list(range(1, n, 2))
        assert isinstance(dm.eval_dataloader("val").sampler, SequentialSampler)
        dm.trainer = None
        assert isinstance(dm.val_dataloader().sampler, SequentialSampler)


# ----------------------------------------------------------------------------- FFCV
@pytest.fixture(scope="module")
def betons(pngs, tmp_path_factory) -> SimpleNamespace:
    pytest.importorskip("ffcv")
    from mrl_vision.data.beton import write_beton

    out = tmp_path_factory.mktemp("betons")
    for split in ("train", "val"):
        write_beton(str(pngs / split), out / f"{split}.beton", num_workers=1)
    return SimpleNamespace(train=out / "train.beton", val=out / "val.beton")


def test_ffcv_interface(betons):
    """The FFCV module's classes, input size, normalisation, resizing or label check are wrong."""
    from mrl_vision.data.ffcv_loader import FFCVDataModule

    dm = FFCVDataModule(str(betons.train), str(betons.val), image_size=32, eval_image_size=24, batch_size=4,
                        num_workers=1, mean=(0.5, 0.4, 0.3), std=[0.2, 0.25, 0.3])
    assert isinstance(dm, MatryoshkaDataModule) and dm.resizable
    assert dm.class_names == sorted(PNG_CLASSES) == dm.classes and dm.num_classes == 3
    assert dm.input_size == 24 and dm.mean == [0.5, 0.4, 0.3] and dm.std == [0.2, 0.25, 0.3]
    _check_norm(dm)
    dm.set_train_resolution(48)
    assert dm.image_size == 48 and dm.input_size == 24
    assert len(dm.eval_dataloader("predict", batch_size=9)) == 1  # the predict file: here the val file's 9 images
    x, y = next(iter(dm.eval_dataloader("val", batch_size=9)))
    assert x.shape == (9, 3, 24, 24) and y.tolist() == [label for label in range(3) for _ in range(VAL_PER_CLASS)]
    batch = [x.clone(), y.clone()]
    assert dm.on_before_batch_transfer(batch, 0) is batch
    batch[1][4] = 7
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 3\)"):
        dm.on_before_batch_transfer(batch, 0)
