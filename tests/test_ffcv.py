"""The FFCV data path: `mrl-vision prepare` -> .beton + sidecar -> FFCVDataModule -> Lightning, on
tiny trees of real JPEG files made here, with timm's ``test_resnet``. CPU only, no mocks."""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

ffcv = pytest.importorskip("ffcv")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from conftest import (  # noqa: E402
    COLOUR_CLASSES,
    COLOUR_HIGH,
    COLOUR_LOW,
    COLOUR_STEP,
    COLOUR_TRAIN_PER_CLASS,
    COLOUR_VAL_PER_CLASS,
    CONFIG_DIR,
    JPEG_CLASSES,
    JPEG_TRAIN_PER_CLASS,
    TEST_RESNET_DIMS,
    write_colour_jpeg_tree,
)
from ffcv.reader import Reader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from mrl_vision.callbacks import ProgressiveResizing, progressive_resolution  # noqa: E402
from mrl_vision.cli import cli, main  # noqa: E402
from mrl_vision.data import FFCVDataModule, QuickstartDataModule  # noqa: E402
from mrl_vision.data.beton import SIDECAR_KEYS, check_beton  # noqa: E402
from mrl_vision.data.ffcv_loader import precision_dtype  # noqa: E402
from mrl_vision.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mrl_vision import MatryoshkaClassifier  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]

FFCV_CONFIG = CONFIG_DIR / "quickstart_ffcv.yaml"
LABEL = {name: i for i, name in enumerate(sorted(COLOUR_CLASSES))}  # blue 0, green 1, red 2
# the order `prepare` writes a folder in: classes sorted, then file names sorted
TRAIN_ORDER = [(c, i) for c in sorted(COLOUR_CLASSES) for i in range(COLOUR_TRAIN_PER_CLASS)]
VAL_ORDER = [(c, i) for c in sorted(COLOUR_CLASSES) for i in range(COLOUR_VAL_PER_CLASS)]
DEFAULT_WRITE_OPTIONS = {"write_mode": "raw", "max_resolution": None, "compress_probability": 0.5, "jpeg_quality": 90}
RAMP = dict(min_res=32, max_res=64, start_ramp=1, end_ramp=3, step=32)


# ----------------------------------------------------------------------------- helpers
def _is_numba_finalizer_error(u) -> bool:
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (u.exc_type is KeyError and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith(os.path.join("numba", "core", "dispatcher.py")))


@pytest.fixture(scope="module", autouse=True)
def _quiet_numba_finalizers():
    """Drop the harmless KeyError that numba's dispatcher finalizers raise when FFCV's compiled
    pipelines are freed. Besides being noise, pytest formats each one with ast.parse as it happens;
    when the garbage collector runs inside pytest's own ast.parse of a failure report, that nested
    parse makes CPython 3.11.7 abort the session ("SystemError: AST constructor recursion depth
    mismatch", an INTERNALERROR)."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_numba_finalizer_error(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    yield
    gc.collect()  # free this module's pipelines while the filter is on
    sys.unraisablehook = previous


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> SimpleNamespace:
    """A colour JPEG tree (3 classes, 5 train / 2 val each) prepared to train.beton and val.beton."""
    root = write_colour_jpeg_tree(tmp_path_factory.mktemp("colours"))
    out = root / "betons"
    for split in ("train", "val"):
        main(["prepare", str(root / split), str(out / f"{split}.beton"), "--num-workers", "1"])
    return SimpleNamespace(root=root, train=out / "train.beton", val=out / "val.beton")


def make_dm(c: SimpleNamespace, **kwargs) -> FFCVDataModule:
    args = dict(train_path=str(c.train), val_path=str(c.val), image_size=32, eval_image_size=24,
                batch_size=4, num_workers=1, drop_last=False)
    args.update(kwargs)
    return FFCVDataModule(**args)


def identify(image: torch.Tensor) -> tuple[str, int]:
    """(class folder, image index) of a decoded colour-tree image (pixels ``[3, H, W]``), from its colour."""
    px = image.float()
    assert float((px.amax((1, 2)) - px.amin((1, 2))).max()) <= 16, "not a constant-colour image"
    mean = px.mean((1, 2))
    c = int(mean.argmax())
    assert abs(float(mean[c]) - COLOUR_HIGH) <= 8, mean
    low = float(mean.sum() - mean[c]) / 2
    i = round((low - COLOUR_LOW) / COLOUR_STEP)
    assert abs(low - (COLOUR_LOW + COLOUR_STEP * i)) <= 8, mean
    return COLOUR_CLASSES[c], i


def to_pixels(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Undo the loader's CPU normalisation: float32 ``(p - 255 mean) / (255 std)`` back to pixels ``p``,
    checking that every value came from an integer pixel in [0, 255] with these per-channel constants."""
    assert x.dtype == torch.float32, x.dtype
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    p = x.double() * s + m
    assert float((p - p.round()).abs().max()) < 2e-3, "not (pixel - 255 mean) / (255 std) of integer pixels"
    assert float(p.min()) > -0.5 and float(p.max()) < 255.5
    return p.round()


def collect(loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One epoch: images, labels and batch sizes, copied out of FFCV's reused buffers."""
    xs, ys, sizes = [], [], []
    for x, y in loader:
        xs.append(x.clone())
        ys.append(y.clone())
        sizes.append(len(y))
    return torch.cat(xs), torch.cat(ys), sizes


def file_labels(path: Path) -> list[int]:
    return [int(v) for v in Reader(str(path)).metadata["f1"]]


def copy_beton(src: Path, folder: Path, name: str = "copy.beton") -> Path:
    """Copy a .beton file and its sidecar into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / name
    shutil.copyfile(src, dst)
    shutil.copyfile(str(src) + ".json", str(dst) + ".json")
    return dst


def edit_sidecar(path: Path, **changes) -> None:
    side = Path(str(path) + ".json")
    info = json.loads(side.read_text())
    for key, value in changes.items():
        if value is None:
            del info[key]
        else:
            info[key] = value
    side.write_text(json.dumps(info))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- background checks
# Four jobs run in fresh Python processes. They are started together when the module starts,
# so that their start-up (torch, Lightning, numba compilation) overlaps the other tests; each test
# then waits for its own process's result.
HANG_SCRIPT = """
import gc
import sys
from mrl_vision.data import FFCVDataModule
dm = FFCVDataModule(train_path=sys.argv[1], val_path=sys.argv[2], image_size=32, eval_image_size=24,
                    batch_size=4, num_workers=2, drop_last=False)
for name, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
    batches = iter(loader)
    x, y = next(batches)
    print("BATCH", name, tuple(x.shape), x.dtype, tuple(y.shape), flush=True)
    # stop FFCV's loader thread before the interpreter exits: left running mid-epoch, it can abort the
    # teardown ("terminate called without an active exception"), which is not what this checks
    batches.close()
    del batches
    gc.collect()
"""

NO_FFCV_SCRIPT = """
import json, sys
sys.modules["ffcv"] = None  # `import ffcv` now raises ImportError
out = {}
from mrl_vision.data import FFCVDataModule
try:
    FFCVDataModule(val_path="x.beton")
except ImportError as e:
    out["module"] = str(e)
from mrl_vision.data.beton import require_ffcv
try:
    require_ffcv()
except ImportError as e:
    out["require"] = str(e)
from mrl_vision.cli import cli, main
try:
    main(["prepare", "quickstart", "q.beton"])
except SystemExit as e:
    out["prepare"] = str(e.code)
try:
    cli(["--config", sys.argv[1], "--trainer.accelerator", "cpu"], run=False)
except BaseException as e:
    out["cli"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
"""

# prepare in a thread with a deadline counted after the imports (a healthy run takes a few seconds)
PREPARE_WATCHDOG_SCRIPT = """
import os, sys, threading
from mrl_vision.cli import main
result = {}
def run():
    try:
        main(["prepare", sys.argv[1], sys.argv[2], "--num-workers", "1"])
        result["error"] = "none"
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
worker = threading.Thread(target=run, daemon=True)
worker.start()
worker.join(120)  # generous: numba compiles in the writer, slow on a loaded 2-core machine
print("HUNG" if worker.is_alive() else "DONE " + result["error"], flush=True)
os._exit(0)
"""


# `mrl-vision prepare quickstart` for the three splits, as configs/quickstart_ffcv.yaml says
PREPARE_QUICKSTART_SCRIPT = """
from mrl_vision.cli import main
for split in ("train", "val", "test"):
    main(["prepare", "quickstart", f"data/quickstart/{split}.beton", "--split", split, "--limit", "20",
          "--num-workers", "1"])
"""


class Background:
    """Subprocesses started now and collected later: ``finish(name, timeout)`` -> (returncode, output)."""

    def __init__(self, work: Path) -> None:
        self.work, self.procs = work, {}

    def start(self, name: str, script: str, *args) -> None:
        cwd = self.work / name
        cwd.mkdir()
        log = open(self.work / f"{name}.log", "w")  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                                cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = (proc, log)

    def finish(self, name: str, timeout: float) -> tuple[int | None, str]:
        proc, log = self.procs[name]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None, (self.work / f"{name}.log").read_text()
        log.close()
        return proc.returncode, (self.work / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc, log in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture(scope="module", autouse=True)
def background(colours, tmp_path_factory):
    """The module's subprocess checks, started at once (see above)."""
    bg = Background(tmp_path_factory.mktemp("background"))
    broken = write_colour_jpeg_tree(bg.work / "broken_tree", val_per_class=0)
    image = broken / "train" / "green" / "green_1.jpg"
    image.write_bytes(image.read_bytes()[:200])  # a truncated download
    bg.start("hang", HANG_SCRIPT, colours.train, colours.val)
    bg.start("no_ffcv", NO_FFCV_SCRIPT, FFCV_CONFIG)
    bg.start("truncated_source", PREPARE_WATCHDOG_SCRIPT, broken / "train", bg.work / "out" / "x.beton")
    bg.start("quickstart", PREPARE_QUICKSTART_SCRIPT)
    yield bg
    bg.stop()


# ----------------------------------------------------------------------------- prepare
def test_prepare_writes_beton_and_sidecar(jpeg_tree, tmp_path):
    """`mrl-vision prepare` on a folder tree does not write a .beton with a complete, truthful sidecar."""
    out = tmp_path / "out" / "train.beton"
    main(["prepare", str(jpeg_tree / "train"), str(out), "--num-workers", "1"])
    side = tmp_path / "out" / "train.beton.json"
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.beton", "train.beton.json"]  # no temp files
    info = json.loads(side.read_text())
    n = len(JPEG_CLASSES) * JPEG_TRAIN_PER_CLASS
    assert info["num_samples"] == n and info["num_classes"] == len(JPEG_CLASSES)
    assert info["classes"] == sorted(p.name for p in (jpeg_tree / "train").iterdir())
    assert info["file_size"] == out.stat().st_size
    assert info["write_options"] == DEFAULT_WRITE_OPTIONS
    assert info["fields"] == ["image", "label"] and set(SIDECAR_KEYS) <= set(info)
    assert check_beton(out) == info
    # labels in folder order: the sorted class index of each image
    assert file_labels(out) == [c for c in range(len(JPEG_CLASSES)) for _ in range(JPEG_TRAIN_PER_CLASS)]
    assert Reader(str(out)).num_samples == n


def test_prepare_limit_keeps_n_per_class(jpeg_tree, tmp_path):
    """`prepare --limit 2` does not keep exactly 2 images of every class."""
    out = tmp_path / "small.beton"
    main(["prepare", str(jpeg_tree / "train"), str(out), "--num-workers", "1", "--limit", "2"])
    info = json.loads((tmp_path / "small.beton.json").read_text())
    assert info["num_samples"] == 2 * len(JPEG_CLASSES)
    assert Counter(file_labels(out)) == {c: 2 for c in range(len(JPEG_CLASSES))}


def test_prepare_refuses_to_overwrite(jpeg_tree, tmp_path):
    """`prepare` silently replaces an existing .beton, or --overwrite does not replace it."""
    out = tmp_path / "train.beton"
    src = str(jpeg_tree / "train")
    main(["prepare", src, str(out), "--num-workers", "1"])
    before = (out.read_bytes(), (tmp_path / "train.beton.json").read_text())
    with pytest.raises(SystemExit) as exc:
        main(["prepare", src, str(out), "--num-workers", "1", "--limit", "1"])
    assert str(out) in str(exc.value.code) and "--overwrite" in str(exc.value.code)
    assert (out.read_bytes(), (tmp_path / "train.beton.json").read_text()) == before
    main(["prepare", src, str(out), "--num-workers", "1", "--limit", "1", "--overwrite"])
    info = json.loads((tmp_path / "train.beton.json").read_text())
    assert info["num_samples"] == len(JPEG_CLASSES) and info["file_size"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["train.beton", "train.beton.json"]


@pytest.mark.parametrize(
    "extra, output, needle",
    [
        (["--jpeg-quality", "0"], "x.beton", "--jpeg-quality must be in [1, 100], got 0"),
        (["--compress-probability", "2"], "x.beton", "--compress-probability must be in [0, 1], got 2"),
        (["--max-resolution", "0"], "x.beton", "--max-resolution must be >= 1, got 0"),
        (["--limit", "0"], "x.beton", "--limit must be >= 1 image per class, got 0"),
        ([], "x.bet", "x.bet"),
        ("MISSING", "x.beton", "no_such_dir"),
        ("EMPTY", "x.beton", "empty_dir"),
    ],
    ids=["jpeg-quality", "compress-probability", "max-resolution", "limit", "suffix", "missing-source", "empty-source"],
)
def test_prepare_rejects_bad_options(extra, output, needle, jpeg_tree, tmp_path):
    """A bad `prepare` option is accepted, or fails without a message naming it, or leaves files behind."""
    source = str(jpeg_tree / "train")
    if extra == "MISSING":
        source, extra = str(tmp_path / "no_such_dir"), []
    elif extra == "EMPTY":
        (tmp_path / "empty_dir").mkdir()
        source, extra = str(tmp_path / "empty_dir"), []
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["prepare", source, str(out_dir / output), "--num-workers", "1", *extra])
    message = str(exc.value.code)
    assert message.startswith("mrl-vision prepare: error:") and needle in message, message
    assert list(out_dir.iterdir()) == []


def test_prepare_rejects_unknown_write_mode(jpeg_tree, tmp_path, capsys):
    """`prepare --write-mode` accepts a mode FFCV does not have."""
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(jpeg_tree / "train"), str(tmp_path / "x.beton"), "--write-mode", "png"])
    assert exc.value.code == 2 and "'png'" in capsys.readouterr().err
    assert list(tmp_path.glob("*.beton*")) == []


@pytest.mark.parametrize("mode, extra", [("jpg", []), ("proportion", ["--compress-probability", "1.0"])])
def test_prepare_jpeg_modes_are_loadable(mode, extra, colours, tmp_path):
    """A .beton written with --write-mode jpg/proportion does not store JPEGs that decode to the right images."""
    out = tmp_path / f"{mode}.beton"
    main(["prepare", str(colours.root / "val"), str(out), "--num-workers", "1", "--write-mode", mode,
          "--jpeg-quality", "95", "--max-resolution", "40", *extra])
    info = json.loads((tmp_path / f"{mode}.beton.json").read_text())
    assert info["write_options"]["write_mode"] == mode and info["write_options"]["max_resolution"] == 40
    meta = Reader(str(out)).metadata["f0"]
    assert (meta["mode"] == 0).all()  # FFCV's code for a JPEG-compressed image
    assert max(int(meta["width"].max()), int(meta["height"].max())) <= 40
    dm = FFCVDataModule(val_path=str(out), eval_image_size=24, batch_size=4, num_workers=1)
    x, y, _ = collect(dm.val_dataloader())
    keys = [identify(img) for img in to_pixels(x)]
    assert keys == VAL_ORDER and y.tolist() == [LABEL[c] for c, _ in keys]


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("order", ["random", "quasi_random"])
def test_train_loader_sees_every_sample_once_per_epoch(order, colours):
    """The training loader skips or repeats samples, mislabels them, or does not honour `order`."""
    dm = make_dm(colours, order=order, os_cache=order != "quasi_random")
    loader = dm.train_dataloader()
    assert len(loader) == 4  # 15 samples, batch 4, drop_last=False
    labels_in_file = sorted(file_labels(colours.train))
    epochs = []
    for _ in range(2):
        x, y, sizes = collect(loader)
        assert sizes == [4, 4, 4, 3] and x.shape == (15, 3, 32, 32) and y.dtype == torch.int64
        keys = [identify(img) for img in to_pixels(x)]  # float32, normalised on the CPU
        assert sorted(keys) == sorted(TRAIN_ORDER)  # every sample exactly once
        assert y.tolist() == [LABEL[c] for c, _ in keys]  # the label belongs to the image
        assert sorted(y.tolist()) == labels_in_file
        epochs.append(keys)
    if order == "random":
        assert epochs[0] != TRAIN_ORDER and epochs[1] != TRAIN_ORDER and epochs[0] != epochs[1]


def test_cpu_batches_are_normalised_float32_nchw(colours):
    """On the CPU the loader does not hand over channels-last float32 NCHW batches normalised with mean/std."""
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 0.2)  # per-channel values that differ: order matters
    dm = make_dm(colours, mean=mean, std=std, order="sequential")
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.shape == (4,)
    assert x.is_contiguous(memory_format=torch.channels_last)
    out_x, out_y = dm.on_after_batch_transfer([x, y], 0)  # as Lightning hands it on
    assert out_x is x and torch.equal(out_y, y) and out_y.data_ptr() != y.data_ptr()  # labels copied
    x, y = x.clone(), y.clone()  # FFCV reuses the buffers
    pixels = to_pixels(x, mean, std)  # integer pixels under exactly these constants, channel by channel
    assert [identify(img) for img in pixels] == TRAIN_ORDER[:4]
    x_all, y_all, _ = collect(loader)  # order="sequential": the file's order, every epoch
    assert [identify(img) for img in to_pixels(x_all, mean, std)] == TRAIN_ORDER
    assert y_all.tolist() == [LABEL[c] for c, _ in TRAIN_ORDER]
    # the same images as the uint8 -> float path used on a GPU (FFCVDataModule.normalize)
    torch.testing.assert_close(dm.normalize(pixels.to(torch.uint8)), x, rtol=1e-6, atol=1e-5)


def test_eval_pipeline_is_deterministic(colours):
    """Evaluation is not a deterministic, sequential, complete pass at eval_image_size."""
    dm = make_dm(colours, drop_last=True)  # drop_last is for training only
    loader = dm.val_dataloader()
    x1, y1, sizes = collect(loader)
    x2, y2, _ = collect(loader)
    assert sizes == [4, 2]
    assert x1.shape == (6, 3, 24, 24) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    keys = [identify(img) for img in to_pixels(x1)]
    assert keys == VAL_ORDER and y1.tolist() == [LABEL[c] for c, _ in keys]
    # test (and predict) default to the validation file
    assert dm.paths["test"] == dm.paths["predict"] == str(colours.val)
    x3, y3, _ = collect(dm.test_dataloader())
    assert torch.equal(x3, x1) and torch.equal(y3, y1)


def test_eval_dataloader_reads_training_split_for_evaluation(colours):
    """eval_dataloader('train') is augmented, shuffled or incomplete (features for probes need neither)."""
    dm = make_dm(colours, drop_last=True, hflip=True)
    x1, y1, sizes = collect(dm.eval_dataloader("train", batch_size=6))
    x2, y2, _ = collect(dm.eval_dataloader("train"))
    assert sizes == [6, 6, 3] and x1.shape == (15, 3, 24, 24)  # every sample, eval size, no drop_last
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # deterministic: no crop, flip or shuffle
    assert y1.tolist() == file_labels(colours.train)  # in file order
    x3, y3, _ = collect(dm.eval_dataloader("predict"))  # what predict reads: here the val file
    assert y3.tolist() == file_labels(colours.val) and x3.shape == (6, 3, 24, 24)
    with pytest.raises(ValueError, match="unknown split 'validation'; choose train, val, test or predict"):
        dm.eval_dataloader("validation")


def test_eval_dataloader_shards_only_when_asked(colours):
    """Under DDP eval_dataloader is sharded without shard=True, or not with it, or the evaluation hooks change."""
    dm = make_dm(colours)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert dm.eval_dataloader("val").indices.tolist() == list(range(6))
    assert dm.eval_dataloader("val", shard=True).indices.tolist() == [1, 3, 5]  # rank 1 of 2: 1, 3, 5
    assert dm.eval_dataloader("train", shard=True).indices.tolist() == list(range(1, 15, 2))
    assert dm.val_dataloader().indices.tolist() == [1, 3, 5]  # as before


def test_drop_last_drops_incomplete_training_batch(colours):
    """drop_last=True yields a short last training batch, or repeats samples."""
    loader = make_dm(colours, drop_last=True).train_dataloader()
    assert len(loader) == 3
    x, y, sizes = collect(loader)
    assert sizes == [4, 4, 4]
    keys = [identify(img) for img in to_pixels(x)]
    assert len(set(keys)) == 12 and set(keys) <= set(TRAIN_ORDER)
    assert y.tolist() == [LABEL[c] for c, _ in keys]


@pytest.mark.parametrize(
    "mean, std",
    [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.25, 0.125), (0.5, 0.25, 0.2))],
    ids=["imagenet-default", "custom"],
)
def test_normalisation_after_batch_transfer(mean, std, colours):
    """The uint8 (GPU) path: on_after_batch_transfer does not compute (x - 255 mean) / (255 std) in float32."""
    kwargs = {} if mean[0] == 0.485 else {"mean": mean, "std": std}
    dm = make_dm(colours, **kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 2])
    out_x, out_y = dm.on_after_batch_transfer([x, y], 0)  # as a uint8 batch arrives on a GPU
    expected = torch.stack([(x[:, c].double() - 255 * mean[c]) / (255 * std[c]) for c in range(3)], 1)
    assert out_x.dtype == torch.float32 and out_x.shape == x.shape
    torch.testing.assert_close(out_x, expected.float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(out_y, y) and out_y.data_ptr() != y.data_ptr()  # a copy of FFCV's reused buffer
    already = torch.randn(2, 3, 5, 4)
    assert dm.on_after_batch_transfer([already, y], 0)[0] is already  # float batches pass through
    assert [precision_dtype(p) for p in ("bf16-mixed", "16-mixed", "32-true", "64-true")] == [
        torch.bfloat16, torch.float16, torch.float32, torch.float64]


def test_num_classes_comes_from_the_sidecar(colours):
    """num_classes/classes are not read from the sidecar, or a mismatching num_classes is accepted."""
    dm = FFCVDataModule(val_path=str(colours.val))
    assert dm.num_classes == 3 and dm.classes == sorted(COLOUR_CLASSES)
    assert FFCVDataModule(val_path=str(colours.val), num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match=r"3 classes but the data module expects num_classes=7"):
        FFCVDataModule(val_path=str(colours.val), num_classes=7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(order="quasi_random", distributed=True), "quasi_random"),
        (dict(order="shuffled"), "order must be one of"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(eval_image_size=0), "eval_image_size must be >= 1"),
        (dict(eval_crop_ratio=0.0), r"eval_crop_ratio must be in \(0, 1\]"),
        (dict(batches_ahead=0), "batches_ahead must be >= 1"),
        (dict(train_path=None, val_path=None), "at least one of"),
    ],
    ids=["quasi-random-ddp", "order", "batch-size", "eval-size", "crop-ratio", "batches-ahead", "no-files"],
)
def test_bad_data_module_arguments(kwargs, match, colours):
    """A bad FFCVDataModule argument is accepted instead of failing with a ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        make_dm(colours, **kwargs)


def test_set_train_resolution_rejects_zero(colours):
    """set_train_resolution accepts a resolution below 1."""
    dm = make_dm(colours)
    with pytest.raises(ValueError, match="resolution must be >= 1, got 0"):
        dm.set_train_resolution(0)
    dm.set_train_resolution(64)
    assert dm.image_size == 64


# ----------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("how", ["truncate", "append"])
def test_truncated_or_grown_file_fails_clearly(how, colours, tmp_path):
    """A truncated or modified .beton reaches FFCV instead of a ValueError naming the file."""
    bad = copy_beton(colours.val, tmp_path)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(0, 2)
            f.write(b"\0" * 10)
    with pytest.raises(ValueError, match="truncated or was modified") as exc:
        FFCVDataModule(train_path=str(colours.train), test_path=str(bad))
    assert str(bad) in str(exc.value) and str(size) in str(exc.value)


def test_missing_file_or_sidecar_fails_clearly(colours, tmp_path):
    """A missing .beton or sidecar does not fail with a FileNotFoundError naming it."""
    missing = tmp_path / "nowhere" / "val.beton"
    with pytest.raises(FileNotFoundError, match="mrl-vision prepare") as exc:
        FFCVDataModule(val_path=str(missing))
    assert str(missing) in str(exc.value)
    bad = copy_beton(colours.val, tmp_path)
    Path(str(bad) + ".json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no sidecar 'copy\.beton\.json'") as exc:
        FFCVDataModule(val_path=str(bad))
    assert str(bad) in str(exc.value)


def test_incomplete_or_wrong_sidecar_fails_clearly(colours, tmp_path):
    """A sidecar lacking a key, not JSON, or disagreeing with the file is trusted instead of rejected."""
    for key in SIDECAR_KEYS:
        bad = copy_beton(colours.val, tmp_path / key)
        edit_sidecar(bad, **{key: None})
        with pytest.raises(ValueError, match=rf"lacks the fields \['{key}'\]"):
            FFCVDataModule(val_path=str(bad))
    bad = copy_beton(colours.val, tmp_path / "json")
    Path(str(bad) + ".json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        FFCVDataModule(val_path=str(bad))
    bad = copy_beton(colours.val, tmp_path / "format")
    edit_sidecar(bad, format="something-else")
    with pytest.raises(ValueError, match=r"lacks the fields \['format'\]"):
        FFCVDataModule(val_path=str(bad))
    bad = copy_beton(colours.val, tmp_path / "count")
    edit_sidecar(bad, num_samples=7)
    with pytest.raises(ValueError, match="holds 6 samples, its sidecar says 7"):
        FFCVDataModule(val_path=str(bad))
    bad = copy_beton(colours.val, tmp_path / "classes")
    edit_sidecar(bad, classes=["blue", "green"])
    with pytest.raises(ValueError, match=r"holds label 2, outside \[0, 2\)"):
        FFCVDataModule(val_path=str(bad))
    bad = copy_beton(colours.val, tmp_path / "names")
    edit_sidecar(bad, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="disagree on their classes"):
        FFCVDataModule(train_path=str(colours.train), val_path=str(bad))


def test_random_bytes_file_fails_clearly(colours, tmp_path):
    """A foreign file of the recorded size crashes inside FFCV/numpy instead of a ValueError naming it."""
    bad = copy_beton(colours.val, tmp_path)
    g = torch.Generator().manual_seed(0)
    bad.write_bytes(torch.randint(0, 256, (bad.stat().st_size,), dtype=torch.uint8, generator=g).numpy().tobytes())
    with pytest.raises(ValueError, match="cannot be read") as exc:
        FFCVDataModule(val_path=str(bad))
    assert str(bad) in str(exc.value)


# ----------------------------------------------------------------------------- progressive resizing
def test_progressive_resolution_reference_recipe():
    """The 160 -> 192 px schedule between epochs 29 and 34 differs from the reference rule."""
    got = [progressive_resolution(e, 160, 192, 29, 34) for e in range(40)]
    # by hand: epochs 30..33 interpolate to 166.4, 172.8, 179.2, 185.6 -> nearest multiple of 32
    assert got == [160] * 32 + [192] * 8
    assert [ProgressiveResizing().resolution(e) for e in range(40)] == got  # the defaults are the recipe
    assert [progressive_resolution(e, 32, 64, 1, 3, 32) for e in range(5)] == [32, 32, 64, 64, 64]  # 48 -> 64
    assert [progressive_resolution(e, 64, 128, 0, 4, 16) for e in range(5)] == [64, 80, 96, 112, 128]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_res=192, max_res=160), "min_res <= max_res"),
        (dict(min_res=0), "min_res <= max_res"),
        (dict(start_ramp=34, end_ramp=34), "end_ramp"),
        (dict(start_ramp=34, end_ramp=29), "end_ramp"),
        (dict(min_res=150), "multiples of step"),
        (dict(max_res=200), "multiples of step"),
        (dict(step=0), "multiples of step"),
    ],
)
def test_progressive_resizing_rejects_bad_arguments(kwargs, match):
    """ProgressiveResizing accepts an impossible schedule."""
    with pytest.raises(ValueError, match=match):
        ProgressiveResizing(**kwargs)


class BatchSizes(L.Callback):
    """Records the spatial size of every training batch, per epoch."""

    def __init__(self) -> None:
        self.sizes: dict[int, list[tuple[int, int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.setdefault(trainer.current_epoch, []).append(tuple(batch[0].shape[-2:]))


def fit_resizing(dm: FFCVDataModule, max_epochs: int, root: Path, ramp=RAMP, ckpt_path=None):
    rec = BatchSizes()
    model = MatryoshkaClassifier(num_classes=dm.num_classes, backbone="test_resnet")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=0, logger=False,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ProgressiveResizing(**ramp), rec, ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, rec.sizes


def test_progressive_resizing_changes_batch_resolution(colours, tmp_path):
    """ProgressiveResizing does not change the FFCV training batches' size at the scheduled epochs."""
    trainer, sizes = fit_resizing(make_dm(colours, image_size=32), 4, tmp_path)
    expected = [progressive_resolution(e, 32, 64, 1, 3, 32) for e in range(4)]
    assert expected == [32, 32, 64, 64]
    assert sizes == {e: [(r, r), (r, r)] for e, r in enumerate(expected)}
    assert trainer.datamodule.image_size == 64
    assert float(trainer.callback_metrics["train/resolution"]) == 64.0


def test_progressive_resizing_first_epoch_uses_min_res(colours, tmp_path):
    """Epoch 0 trains at the data module's image_size instead of ProgressiveResizing's min_res."""
    _, sizes = fit_resizing(make_dm(colours, image_size=64), 1, tmp_path)
    assert sizes == {0: [(32, 32), (32, 32)]}


def test_progressive_resizing_resume_uses_the_epoch_resolution(colours, tmp_path):
    """A run resumed from a checkpoint trains its first epoch at the wrong resolution."""
    ramp = dict(RAMP, start_ramp=0, end_ramp=1)  # epoch 0: 32 px, epoch 1: 64 px
    _, sizes = fit_resizing(make_dm(colours), 1, tmp_path, ramp)
    assert sizes == {0: [(32, 32), (32, 32)]}
    _, sizes = fit_resizing(make_dm(colours), 2, tmp_path, ramp, ckpt_path=str(tmp_path / "last.ckpt"))
    assert sizes == {1: [(64, 64), (64, 64)]}


def test_progressive_resizing_needs_a_resizable_data_module(run_dir):
    """ProgressiveResizing silently does nothing with a data module that cannot resize."""
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ProgressiveResizing()])
    with pytest.raises(TypeError, match=r"ProgressiveResizing needs a data module that can change its training "
                       r"resolution; QuickstartDataModule cannot \(use FFCVDataModule\)"):
        trainer.fit(model, datamodule=QuickstartDataModule(batch_size=16))
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------- flip TTA
def test_eval_flip_tta_sums_mirror_logits():
    """eval_flip_tta does not sum the logits of the image and its horizontal mirror image."""
    torch.manual_seed(0)
    tta = MatryoshkaClassifier(num_classes=3, backbone="test_resnet", eval_flip_tta=True).eval()
    plain = MatryoshkaClassifier(num_classes=3, backbone="test_resnet", eval_flip_tta=False).eval()
    plain.load_state_dict(tta.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = tta.eval_logits(x)
        expected = tta(x) + tta(x.flip(-1))
        assert got.shape == (len(TEST_RESNET_DIMS), 2, 3)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, 2 * tta(x), atol=1e-3)  # the mirror image matters here
        assert not torch.allclose(got, tta(x) + tta(x.flip(-2)), atol=1e-3)  # horizontal, not vertical
        assert torch.equal(plain.eval_logits(x), plain(x))


# ----------------------------------------------------------------------------- CLI
def test_cli_fit_and_test_on_quickstart_betons(run_dir, background):
    """`prepare quickstart` + `fit`/`test` with configs/quickstart_ffcv.yaml do not train and report per size."""
    rc, out = background.finish("quickstart", timeout=300)  # the three `prepare quickstart` runs
    assert rc == 0, out[-3000:]
    data = background.work / "quickstart" / "data"
    for split in ("train", "val", "test"):
        info = json.loads((data / "quickstart" / f"{split}.beton.json").read_text())
        assert info["num_samples"] == 200 and info["classes"] == [str(d) for d in range(10)]  # --limit 20
        assert info["split"] == split
    (run_dir / "data").symlink_to(data, target_is_directory=True)
    common = ["--config", str(FFCV_CONFIG), "--model.backbone", "test_resnet", "--trainer.accelerator", "cpu",
              "--data.init_args.num_workers", "1", "--trainer.enable_progress_bar", "false"]
    # fit reads the config's own relative paths (data/quickstart/*.beton under the working directory)
    c = cli(["fit", *common, "--trainer.max_epochs", "1"])
    assert isinstance(c.datamodule, FFCVDataModule) and c.model.hparams.num_classes == c.model.model.num_classes == 10
    assert c.trainer.global_step == 2  # 200 images, batch 128, drop_last false
    assert "val/top1@8" in c.trainer.callback_metrics
    ckpt = run_dir / "runs" / "quickstart_ffcv" / "version_0" / "checkpoints" / "last.ckpt"
    assert Path(c.trainer.checkpoint_callback.last_model_path).resolve() == ckpt
    test_beton = str(data / "quickstart" / "test.beton")
    t = cli(["test", *common, "--data.init_args.test_path", test_beton, "--ckpt_path", str(ckpt)])
    assert t.datamodule.paths["test"] == test_beton
    rows = _read_csv(run_dir / t.trainer.log_dir / "test_accuracy.csv")
    assert [int(r["dims"]) for r in rows] == TEST_RESNET_DIMS
    assert all(0.0 <= float(r["top1"]) <= float(r["top5"]) <= 100.0 for r in rows)
    top1 = float(t.trainer.callback_metrics["test/top1@8"])
    assert 0.0 <= top1 <= 1.0 and float(rows[0]["top1"]) == pytest.approx(100 * top1)
    assert abs(top1 * 200 - round(top1 * 200)) < 1e-3  # a whole number of the 200 test images


def test_quickstart_ffcv_config_prints(run_dir, capsys):
    """configs/quickstart_ffcv.yaml does not parse, or its data settings are lost."""
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", str(FFCV_CONFIG), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = yaml.safe_load(FFCV_CONFIG.read_text())
    assert printed["data"]["class_path"] == "mrl_vision.data.FFCVDataModule"
    for key, value in cfg["data"]["init_args"].items():
        assert printed["data"]["init_args"][key] == value, key
    assert printed["trainer"]["logger"]["init_args"]["name"] == "quickstart_ffcv"


def test_quickstart_ffcv_config_without_files_fails_clearly(run_dir):
    """The FFCV config without prepared files fails late or without naming the file and `prepare`."""
    with pytest.raises(SystemExit) as exc:  # one line: the data module's own message
        cli(["--config", str(FFCV_CONFIG), "--model.backbone", "test_resnet", "--trainer.accelerator", "cpu"],
            run=False)
    message = str(exc.value)
    assert message.startswith("mrl-vision: error: ") and "\n" not in message
    assert "data/quickstart/" in message and "does not exist" in message and "mrl-vision prepare" in message


# ----------------------------------------------------------------------------- the CPU hang
def test_loader_construction_does_not_hang(background):
    """Building the CPU Loader (or its first batch) hangs: FFCV's grouping loop on alternating JIT/torch ops."""
    rc, out = background.finish("hang", timeout=120)
    assert rc is not None, f"FFCV Loader construction + first batch did not finish in 120 s (pipeline hang):\n{out[-3000:]}"
    assert rc == 0, out[-3000:]
    assert "BATCH train (4, 3, 32, 32) torch.float32 (4,)" in out
    assert "BATCH val (4, 3, 24, 24) torch.float32 (4,)" in out


# ----------------------------------------------------------------------------- without ffcv
def test_without_ffcv_the_error_says_how_to_install(background):
    """Without ffcv, the FFCV entry points fail without saying how to install it."""
    rc, out = background.finish("no_ffcv", timeout=180)
    assert rc == 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert sorted(result) == ["cli", "module", "prepare", "require"]
    for where, message in result.items():
        assert "pip install 'mrl-vision[ffcv]'" in message and "libturbojpeg" in message, (where, message)
    assert result["module"] == result["require"] and "\n" not in result["module"]
    assert result["prepare"].startswith("mrl-vision prepare: error: FFCV is not installed")
    assert not list((background.work / "no_ffcv").iterdir())  # nothing written


# ----------------------------------------------------------------------------- a corrupt source image
def test_prepare_fails_clearly_on_a_truncated_source_image(background):
    """`prepare` hangs, or fails without naming the broken image, on a truncated JPEG in the tree."""
    rc, out = background.finish("truncated_source", timeout=180)
    assert rc == 0, out[-3000:]
    assert "HUNG" not in out, "prepare was still running 120 s after it started"
    done = next(ln for ln in out.splitlines() if ln.startswith("DONE "))
    assert done != "DONE none" and "green_1.jpg" in done, done  # an error naming the broken image
    out_dir = background.work / "out"
    assert not (out_dir.exists() and any(out_dir.iterdir()))  # no temporary or partial file left


# ----------------------------------------------------------------------------- 2D Matryoshka
def test_2d_matryoshka_trains_through_ffcv_with_the_callbacks(colours, tmp_path):
    """2D Matryoshka (an MRL-E head) does not train from FFCV batches, or the grid, the cascade and the kNN
    monitor do not all run beside it."""
    from mrl_vision.callbacks import AdaptiveClassificationCallback, KNNMonitor

    torch.manual_seed(0)
    dm = make_dm(colours, eval_image_size=32)
    model = MatryoshkaClassifier(num_classes=dm.num_classes, backbone="test_vit", head="mrl_e", input_size=32,
                                 optimizer="adamw", lr=1e-3, matryoshka_2d={"n_layers_per_step": 2}, eval_layers=[3])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0,
                        callbacks=[AdaptiveClassificationCallback(), KNNMonitor(bank_size=8, k=3)])
    trainer.fit(model, datamodule=dm)
    logged = trainer.callback_metrics
    assert {"val/top1@L3/8", "val/top1@L3/64", "val/top1@64", "adaptive/top1", "val/knn_top1@8",
            "train/loss_kl"} <= set(logged)
    assert float(logged["train/loss_prior"]) > 0


def test_recipe_options_train_through_ffcv(colours, tmp_path):
    """RandAugment + random erasing (on the device, after FFCV), Mixup/CutMix soft targets and the EMA do not
    train together from FFCV batches: the training loader must hand over uint8 images (the CPU pipeline skips
    its normalisation), the batches reaching the step must be augmented floats, evaluation must stay plain, and
    the checkpoint must hold the average with the cascade's thresholds."""
    from mrl_vision.callbacks import EMA, AdaptiveClassificationCallback

    dm = make_dm(colours, auto_augment="rand-m9-n2", random_erasing=0.5)
    x, _ = next(iter(dm.make_loader("train")))
    assert x.dtype == torch.uint8  # normalised later, on the device, after the augmentation
    plain = dm.normalize(x.clone())  # RandomResizedCrop of constant-colour images: constant images
    assert float(plain.flatten(2).std(2).max()) < 0.05

    seen = []

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].clone())

    torch.manual_seed(0)
    model = MatryoshkaClassifier(num_classes=dm.num_classes, backbone="test_resnet", mixup_alpha=0.8, cutmix_alpha=1.0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Batches(), EMA(decay=0.9), AdaptiveClassificationCallback(),
                                   ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, datamodule=dm)
    assert len(seen) == 2 and all(b.dtype == torch.float32 for b in seen)
    # RandAugment's geometric operations and the erasing's noise vary pixels of constant-colour images
    assert max(float(b.flatten(2).std(2).max()) for b in seen) > 0.2
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["ema"]["updates"] == 2 and "current_model_state" in ckpt
    assert not bool(torch.isnan(ckpt["state_dict"]["model.adaptive_thresholds"]).any())


@pytest.mark.parametrize("variant, head, dims", [("resnet18_mrl", "MatryoshkaHead", [8, 16, 32, 64, 128, 256, 512]),
                                                 ("resnet50_ff", "FixedFeatureHead", [8])])
def test_tinyimagenet_recipe_instantiates(variant, head, dims, colours, run_dir):
    """configs/tinyimagenet/recipe.yaml + a model file does not build the recipe it documents: RandAugment and
    random erasing on the FFCV batches, Mixup/CutMix, the EMA callback and the bounded cascade."""
    from mrl_vision.callbacks import EMA, AdaptiveClassificationCallback

    c = cli(["--config", str(CONFIG_DIR / "tinyimagenet/recipe.yaml"),
             "--config", str(CONFIG_DIR / f"tinyimagenet/{variant}.yaml"),
             "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
             "--data.init_args.train_path", str(colours.train), "--data.init_args.val_path", str(colours.val),
             "--data.init_args.test_path", str(colours.val)], run=False)
    assert type(c.model.model.head).__name__ == head and c.model.model.dims == dims
    assert c.datamodule.batch_augment.active and c.datamodule.hparams.auto_augment == "rand-m9-n2"
    assert c.model.mixing is not None and c.model.hparams.cutmix_alpha == 1.0
    ema = [cb for cb in c.trainer.callbacks if isinstance(cb, EMA)]
    assert len(ema) == 1 and ema[0].decay == 0.9998
    cascade = [cb for cb in c.trainer.callbacks if isinstance(cb, AdaptiveClassificationCallback)]
    assert cascade[0].confidence == 0.95


def test_training_views_are_independent_crops_of_the_same_image(colours, jpeg_tree, tmp_path):
    """views=2: every training sample comes as two crops of one image (its colour), each view with its own
    seeded draws; the label is the image's; evaluation keeps one view."""
    dm = make_dm(colours, views=2, order="sequential", rrc_scale=(0.08, 0.3))
    batches = []
    for batch in dm.train_dataloader():
        x, y = dm.on_after_batch_transfer(list(batch), 0)
        batches.append((x.clone(), y.clone()))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (15, 2, 3, 32, 32) and y.tolist() == [LABEL[c] for c, _ in TRAIN_ORDER]
    for v in range(2):  # both views of sample i are crops of image i (constant colour: same pixels)
        assert [identify(img) for img in to_pixels(x[:, v].contiguous())] == TRAIN_ORDER
    one = make_dm(colours, order="sequential", rrc_scale=(0.08, 0.3))
    x1 = torch.cat([dm.on_after_batch_transfer(list(b), 0)[0].clone() for b in one.train_dataloader()])
    torch.testing.assert_close(x1, x[:, 0])  # view 0 is what one view gives: the same seed
    # on images of random pixels the two views differ (their own crops and flips)
    main(["prepare", str(jpeg_tree / "train"), str(tmp_path / "noise.beton"), "--num-workers", "1"])
    noise = FFCVDataModule(train_path=str(tmp_path / "noise.beton"), image_size=32, batch_size=4, num_workers=1,
                           views=2)
    xn, _ = noise.on_after_batch_transfer(list(next(iter(noise.train_dataloader()))), 0)
    assert xn.shape == (4, 2, 3, 32, 32)
    assert all(not torch.equal(xn[i, 0], xn[i, 1]) for i in range(4))
    xv, yv = dm.on_after_batch_transfer(list(next(iter(dm.val_dataloader()))), 0)
    assert xv.shape == (4, 3, 24, 24)
    with pytest.raises(ValueError, match="views"):
        make_dm(colours, views=0)
