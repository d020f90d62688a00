"""Faulty image-folder data: 16-bit PNGs, hidden entries, empty class folders, corrupt and truncated
images, a root that is a file, a batch larger than the training split, a missing validation folder
(held out from train instead), and unlabeled images to predict. Synthetic images only."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import find_classes

from mrl_vision.data import ImageFolderDataModule, QuickstartDataModule
from mrl_vision.data.beton import FolderSource
from mrl_vision.data.imagefolder import read_image, to_rgb8
from mrl_vision.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def grey_png(path: Path, level: int, size: int = 16) -> Path:
    """A constant 8-bit grey ``size`` px PNG (saved as RGB) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), level, np.uint8)).save(path)
    return path


def tree(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png`` with ``counts[split][class]`` constant grey images each."""
    for split, classes in counts.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                grey_png(root / split / c / f"{i:03d}.png", 10 * i)
    return root


def dm_of(root: Path, **kwargs) -> ImageFolderDataModule:
    args = dict(image_size=16, eval_crop_ratio=1.0, batch_size=2, num_workers=0)
    return ImageFolderDataModule(str(root), **{**args, **kwargs})


def greys(x: torch.Tensor) -> list[int]:
    """The mean grey level (0..255) of each normalised image of a batch ``[B, 3, H, W]``."""
    p = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (p.mean((1, 2, 3)) * 255).round().long().tolist()


def q(path: Path) -> str:
    """A regular expression matching ``path`` as the messages quote it."""
    return re.escape(repr(str(path)))


def truncated_jpeg(path: Path) -> Path:
    """A JPEG of random pixels at ``path``, cut to the first half of its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# ----------------------------------------------------------------------------- 16-bit images
LEVELS_16 = (0, 32896, 65535)  # round(v / 257) = 0, 128, 255


def test_16bit_png_is_scaled_to_8_bits(tmp_path):
    """16-bit grey PNGs read as white (PIL's clipping) or not as round(value / 257) through the
    data module's eval loader and through prepare's FolderSource."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            for v in LEVELS_16:
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((16, 16), v, np.uint16)).save(tmp_path / split / c / f"{v:05d}.png")
    assert Image.open(tmp_path / "val" / "a" / "32896.png").mode.startswith("I")  # really a 16-bit file
    x, y = next(iter(dm_of(tmp_path, batch_size=6).eval_dataloader("val")))
    assert greys(x) == [0, 128, 255] * 2 and y.tolist() == [0, 0, 0, 1, 1, 1]
    source = FolderSource(tmp_path / "val")
    for i, expected in enumerate([0, 128, 255] * 2):
        image, label = source[i]
        assert image.mode == "RGB" and np.unique(np.asarray(image)).tolist() == [expected]


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I", "<i4")])
def test_16bit_modes_scale_every_value(mode, dtype):
    """Some 16-bit mode is clipped or scaled other than round(value / 257) (computed here in floats)."""
    values = np.array([[0, 1, 128, 129, 257, 32896, 40000, 65279, 65534, 65535]])
    image = Image.frombytes(mode, (values.shape[1], 1), values.astype(dtype).tobytes())
    out = np.asarray(to_rgb8(image))
    assert out.shape == (1, values.shape[1], 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == np.rint(values / 257).astype(int).tolist()
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_other_modes_convert_as_pil_does(tmp_path):
    """Grey + alpha, palette or CMYK images read differently from PIL's own conversion to RGB."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for mode, ext in (("LA", "png"), ("P", "png"), ("CMYK", "jpg"), ("L", "png"), ("RGBA", "png")):
        path = tmp_path / f"{mode}.{ext}"
        rgb.convert(mode).save(path)
        got = read_image(path)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(Image.open(path).convert("RGB")))


# ----------------------------------------------------------------------------- hidden entries, empty classes
def test_hidden_folders_and_files_are_ignored(tmp_path):
    """A hidden folder (.ipynb_checkpoints) becomes a class, or hidden files (._x.jpg AppleDouble,
    .thumbs/) are read as images, or the labels differ from torchvision's on the clean tree."""
    root = tree(tmp_path / "data", {"train": {"owl": 2, "ant": 2}, "val": {"owl": 1, "ant": 1}})
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for split in ("train", "val"):
        grey_png(root / split / ".ipynb_checkpoints" / "000-checkpoint.png", 0)
        grey_png(root / split / "owl" / ".thumbs" / "000.png", 0)
        (root / split / "ant" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
        (root / split / ".DS_Store").write_bytes(b"junk")
    dm = dm_of(root)
    assert dm.class_names == ["ant", "owl"]
    assert dm.class_to_idx == find_classes(str(clean / "train"))[1]
    for split in ("train", "val"):
        names = dm.sample_names(split)
        assert not any(part.startswith(".") for n in names for part in n.split("/")), names
        assert len(names) == {"train": 4, "val": 2}[split]
        assert len(list(dm.eval_dataloader(split))) >= 1  # every file reads
    source = FolderSource(root / "train")
    assert source.classes == ["ant", "owl"] and [Path(p).name for p, _ in source.samples] == ["000.png", "001.png"] * 2


def test_empty_class_folder_fails_or_is_allowed(tmp_path):
    """An empty class folder silently counts as a class (its label never seen), or cannot be allowed
    explicitly, or fails without naming it; an empty val folder of a known class fails."""
    root = tree(tmp_path, {"train": {"ant": 2, "owl": 2}, "val": {"ant": 1, "owl": 1}})
    (root / "train" / "bee").mkdir()
    (root / "train" / "cow").mkdir()
    (root / "train" / "cow" / "notes.txt").write_text("not an image")
    msg = rf"class folders with no images: \['bee', 'cow'\] in {q(root / 'train')} " \
          r"\(remove them or pass allow_empty_classes=True\)$"
    with pytest.raises(ValueError, match=msg):
        dm_of(root)
    with pytest.raises(ValueError, match=msg):
        FolderSource(root / "train")
    dm = dm_of(root, allow_empty_classes=True)
    assert dm.class_names == ["ant", "bee", "cow", "owl"] and dm.class_to_idx["owl"] == 3
    assert FolderSource(root / "train", allow_empty_classes=True).classes == dm.class_names
    (root / "val" / "bee").mkdir()  # a validation split may lack a class's images
    assert torch.cat([y for _, y in dm_of(root, allow_empty_classes=True).val_dataloader()]).tolist() == [0, 3]


# ----------------------------------------------------------------------------- corrupt and truncated images
@pytest.fixture
def with_truncated(tmp_path) -> tuple[Path, Path]:
    """A tree whose val split holds one truncated JPEG among 4 good PNGs."""
    root = tree(tmp_path, {"train": {"ant": 2, "owl": 2}, "val": {"ant": 2, "owl": 2}})
    return root, truncated_jpeg(root / "val" / "owl" / "broken.jpg")


def test_truncated_image_is_named_when_read(with_truncated):
    """A truncated JPEG stops an epoch without naming the file (or reads as a partial image)."""
    root, bad = with_truncated
    with pytest.raises(ValueError, match=rf"cannot read image {q(bad)}: OSError: .*truncated"):
        list(dm_of(root).eval_dataloader("val"))
    with pytest.raises(ValueError, match=f"cannot read image {q(bad)}"):
        read_image(bad)
    with pytest.raises(ValueError, match="cannot read image '.*missing.png': FileNotFoundError"):
        read_image(root / "missing.png")


def test_verify_images_fails_at_construction(with_truncated, tmp_path):
    """verify_images does not fail when the module is built, or does not name the unreadable files;
    or a module without it reads images when built."""
    root, bad = with_truncated
    (root / "val" / "ant" / "zero.png").write_bytes(b"")
    zero = root / "val" / "ant" / "zero.png"
    with pytest.raises(ValueError, match=rf"^2 unreadable image\(s\) in {q(root / 'val')}: \[{q(zero)}, {q(bad)}\] "
                       r"\(replace or remove them, or pass skip_unreadable=True to leave them out\)$"):
        dm_of(root, verify_images=True)
    assert dm_of(root).skipped == {}  # not verified: built without reading an image


def test_skip_unreadable_drops_and_counts(with_truncated):
    """skip_unreadable fails, keeps the broken image, does not count it in skipped or does not warn."""
    root, bad = with_truncated
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable image\(s\) of the val split: \[{q(bad)}\]"):
        dm = dm_of(root, skip_unreadable=True)
    assert dm.skipped["val"] == [str(bad)] and dm.skipped["test"] == [str(bad)] and dm.skipped["train"] == []
    assert len(dm.dataset("val")) == 4 and str(bad) not in [p for p, _ in dm.dataset("test").samples]
    assert sum(len(y) for _, y in dm.val_dataloader()) == 4


# ----------------------------------------------------------------------------- root, batch size
def test_root_that_is_a_file(tmp_path):
    """A root that is a file is not reported as such, naming it."""
    f = tmp_path / "data.tar"
    f.write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match=rf"^data root {q(f)} is a file, not a folder$"):
        dm_of(f)


def test_batch_larger_than_training_split(tmp_path):
    """A batch_size above the training images (per device under DDP) is accepted when training starts,
    though the dropped last batch leaves no training step; or evaluation loses its batches."""
    root = tree(tmp_path, {"train": {"ant": 2, "owl": 3}, "val": {"ant": 1, "owl": 1}})
    dm = dm_of(root, batch_size=6)
    with pytest.raises(ValueError, match=r"^batch_size=6 is larger than the 5 training samples: the last incomplete "
                       r"training batch is dropped, so training would run no step \(lower batch_size\)$"):
        dm.train_dataloader()
    assert len(dm.eval_dataloader("train")) == 1 and len(dm.val_dataloader()) == 1  # evaluation keeps its batches
    ddp = dm_of(root, batch_size=4)
    ddp.trainer = SimpleNamespace(world_size=2, global_rank=0)  # 3 samples per device
    with pytest.raises(ValueError, match=r"^batch_size=4 is larger than the 5 training samples shared by 2 devices"):
        ddp.train_dataloader()
    assert len(dm_of(root, batch_size=5).train_dataloader()) == 1


# ----------------------------------------------------------------------------- held-out validation
HELD = {"ant": 10, "bee": 7, "cow": 2, "owl": 1}


@pytest.fixture
def train_only(tmp_path) -> Path:
    return tree(tmp_path, {"train": HELD})


def test_missing_val_folder_names_the_option(train_only):
    """A tree with only train/ fails later or without naming the val folder and val_fraction."""
    with pytest.raises(FileNotFoundError, match=rf"^validation split {q(train_only / 'val')} does not exist "
                       rf"\(create it, or pass val_fraction=0.1 to hold out 10% of {q(train_only / 'train')}\)$"):
        dm_of(train_only)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        dm_of(train_only, val_fraction=1.5)


def test_val_fraction_holds_out_a_stratified_disjoint_split(train_only):
    """The held-out split overlaps training, is not stratified (round(f * n) per class, >= 1 when
    n >= 2, none of a single image), changes between runs with one seed or not with another seed,
    or changes the classes; the test split is not the held-out one without test/val folders."""
    dm = dm_of(train_only, val_fraction=0.3, split_seed=0)
    train, val = dm.sample_names("train"), dm.sample_names("val")
    assert not set(train) & set(val) and len(train) + len(val) == sum(HELD.values())
    per_class = {c: sum(n.split("/")[1] == c for n in val) for c in HELD}
    assert per_class == {"ant": 3, "bee": 2, "cow": 1, "owl": 0}  # round(3.0), round(2.1), max(1, round(0.6)), n=1
    assert dm.class_names == sorted(HELD) and dm.num_classes == 4
    assert dm.sample_names("test") == val and dm.sample_names("predict") == val
    assert [dm.class_names[y] for _, y in dm.dataset("val").samples] == [n.split("/")[1] for n in val]
    assert dm_of(train_only, val_fraction=0.3, split_seed=0).sample_names("val") == val  # deterministic
    assert dm_of(train_only, val_fraction=0.3, split_seed=1).sample_names("val") != val
    assert len(list(dm.train_dataloader())) == len(train) // 2


def test_val_fraction_with_a_val_folder_tests_on_it(train_only):
    """With val_fraction and a val/ folder, the test split is not the val folder (or val is not held out)."""
    tree(train_only, {"val": {"ant": 1, "owl": 1}})
    dm = dm_of(train_only, val_fraction=0.5)
    assert all(n.startswith("train/") for n in dm.sample_names("val"))
    assert dm.sample_names("test") == ["val/ant/000.png", "val/owl/000.png"]


# ----------------------------------------------------------------------------- predicting unlabeled images
def test_predict_dir_yields_images_in_name_order(tmp_path):
    """predict_dir's loader yields labels, misses or adds images (hidden, non-image), is out of name
    order, or its sample names differ; or the label check rejects an images-only batch."""
    root = tree(tmp_path / "data", {"train": {"ant": 2, "owl": 2}, "val": {"ant": 1, "owl": 2}})
    flat = tmp_path / "to_predict"
    for name, level in (("b.png", 20), ("a.png", 10), ("c.png", 30), (".a.png", 99)):
        grey_png(flat / name, level)
    (flat / "readme.txt").write_text("not an image")
    dm = dm_of(root, predict_dir=str(flat))
    batches = list(dm.predict_dataloader())
    assert all(torch.is_tensor(b) for b in batches) and [len(b) for b in batches] == [2, 1]
    assert greys(torch.cat(batches)) == [10, 20, 30]
    assert dm.on_before_batch_transfer(batches[0], 0) is batches[0]
    assert dm.sample_names("predict") == ["a.png", "b.png", "c.png"]
    assert dm.sample_names("train") == [f"train/{c}/00{i}.png" for c in ("ant", "owl") for i in (0, 1)]
    assert dm.sample_names("val") == dm.sample_names("test") == ["val/ant/000.png", "val/owl/000.png", "val/owl/001.png"]
    with pytest.raises(ValueError, match="unknown split 'predict'"):
        dm.dataset("predict")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        dm.sample_names("valid")
    plain = dm_of(root)  # without predict_dir: predict is the labelled test split
    assert plain.sample_names("predict") == plain.sample_names("test")
    assert [len(y) for _, y in plain.predict_dataloader()] == [2, 1]
    assert QuickstartDataModule().sample_names("test") is None


def test_predict_dir_is_checked_when_built(tmp_path):
    """A missing or empty predict_dir fails only when predicting, or without naming it."""
    root = tree(tmp_path / "data", {"train": {"ant": 2}, "val": {"ant": 1}})
    with pytest.raises(FileNotFoundError, match=rf"^predict_dir {q(tmp_path / 'nope')} does not exist$"):
        dm_of(root, predict_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^predict_dir {q(tmp_path / 'empty')} holds no images"):
        dm_of(root, predict_dir=str(tmp_path / "empty"))


def test_missing_test_dir_fails_when_built(tmp_path):
    """An explicit test_dir that does not exist is accepted until testing starts."""
    root = tree(tmp_path, {"train": {"ant": 2}, "val": {"ant": 1}})
    with pytest.raises(FileNotFoundError, match=rf"^test split {q(root / 'holdout')} does not exist$"):
        dm_of(root, test_dir="holdout")
