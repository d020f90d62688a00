"""Fault injection for the model, the CLI and the reports: each test feeds one bad input or fault and
checks the right behaviour or a clear, early error naming the bad value (never a silently wrong
number). Data-side faults: tests/test_faults_data.py; prepare and .beton faults: tests/test_faults_prepare.py;
resuming: tests/test_resume.py and tests/test_soak.py."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIG_DIR, QUICKSTART_ARGS, TEST_RESNET_DIMS, short_quickstart_fit, write_jpeg_tree

from mrl_vision import MatryoshkaModel
from mrl_vision.callbacks import AccuracyReport, AdaptiveClassificationCallback
from mrl_vision.cli import cli, main
from mrl_vision.metrics import MatryoshkaAccuracy
from mrl_vision.report import read_run_results, write_report

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the logging interval")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A short real quickstart fit (test_resnet): the CLI object, its checkpoint on `.checkpoint`."""
    return short_quickstart_fit(tmp_path_factory.mktemp("fit"))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- inference mode
def test_inference_does_not_depend_on_the_batch_or_change_the_model():
    """predict/embed/predict_adaptive on a model in training mode use batch statistics (8 images in
    one batch disagree with two batches of 4), update BatchNorm's running statistics, track
    gradients, or leave the model in another mode."""
    torch.manual_seed(0)
    model = MatryoshkaModel("test_resnet", num_classes=5)  # a new model is in training mode
    assert model.training
    x = torch.randn(8, 3, 32, 32) * 3 + 1
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    whole = model.predict(x, 8)
    halves = torch.cat([model.predict(x[:4], 8), model.predict(x[4:], 8)])
    assert torch.equal(whole, halves)
    e = model.embed(x[:1], 16)  # a batch of one works (BatchNorm in training mode would fail on it)
    assert e.shape == (1, 16) and not e.requires_grad
    preds, dims = model.predict_adaptive(x, thresholds=[0.5] * 4)
    assert preds.shape == dims.shape == (8,)
    assert model.training  # the mode is restored
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k


# ----------------------------------------------------------------------------- weights and classes
def test_evaluating_without_weights_is_refused(run_dir):
    """test/validate/predict without --ckpt_path evaluate a randomly initialised model."""
    for sub in ("test", "validate", "predict"):
        with pytest.raises(SystemExit, match=f"mrl-vision {sub}: error: no weights: give --ckpt_path"):
            cli([sub, *QUICKSTART_ARGS])


def test_checkpoint_of_other_classes_is_refused(fitted, run_dir):
    """A checkpoint of 10 digit classes tested on a 3-class folder, or on a folder of 10 other classes,
    reports an accuracy (or a state-dict size mismatch) instead of naming the difference."""
    root = write_jpeg_tree(run_dir / "three")
    data = ["--data", "mrl_vision.data.ImageFolderDataModule", "--data.init_args.root", str(root),
            "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4"]
    args = ["test", *QUICKSTART_ARGS[2:], *data, "--ckpt_path", str(fitted.checkpoint)]
    with pytest.raises(SystemExit, match="the checkpoint has 10 classes, the data 3"):
        cli(args)
    ten = write_jpeg_tree(run_dir / "ten", classes=tuple(f"c{i}" for i in range(10)), train_per_class=1, val_per_class=1)
    args[args.index(str(root))] = str(ten)
    with pytest.raises(SystemExit, match=r"classes are not the data's \(only in the checkpoint: \['0', '1'"):
        cli(args)


def test_options_that_cannot_apply_are_refused(fitted, run_dir):
    """`predict --model.dims '[8,16]'` with a checkpoint of 5 sizes silently writes all 5."""
    with pytest.raises(SystemExit, match=r"--model.dims \[8, 16\] cannot apply: the checkpoint .* has dims \[8, 16, 32, 64, 96\]"):
        cli(["predict", *QUICKSTART_ARGS, "--model.dims", "[8, 16]", "--ckpt_path", str(fitted.checkpoint)])
    with pytest.raises(SystemExit, match="--model.head 'mrl_e' cannot apply"):
        cli(["test", *QUICKSTART_ARGS, "--model.head", "mrl_e", "--ckpt_path", str(fitted.checkpoint)])


def test_truncated_checkpoint_is_named(fitted, run_dir):
    """A truncated checkpoint fails with an unpickling traceback instead of one line naming it."""
    bad = run_dir / "half.ckpt"
    data = fitted.checkpoint.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"checkpoint '.*half.ckpt' is unreadable \(truncated"):
        cli(["test", *QUICKSTART_ARGS, "--ckpt_path", str(bad)])
    with pytest.raises(SystemExit, match=r"--ckpt_path '.*missing.ckpt' does not exist"):
        cli(["test", *QUICKSTART_ARGS, "--ckpt_path", str(run_dir / "missing.ckpt")])


# ----------------------------------------------------------------------------- early, clear errors
def test_inputs_too_small_are_refused_at_construction():
    """An image size below the network's total stride trains on 1-pixel maps, or a ViT fails deep
    inside; a ViT does not take the data's image size by itself."""
    with pytest.raises(ValueError, match=r"input size 8 px is smaller than the smallest 'test_resnet' takes: 32 px"):
        MatryoshkaModel("test_resnet", num_classes=3, input_size=8)
    with pytest.raises(ValueError, match=r"input size 40 px does not fit 'test_vit': .*multiple of 16"):
        MatryoshkaModel("test_vit", num_classes=3, input_size=40)
    vit = MatryoshkaModel("vit_tiny_patch16_224", num_classes=3, input_size=32).eval()
    assert vit(torch.randn(2, 3, 32, 32)).shape == (len(vit.dims), 2, 3)


def test_cli_errors_are_one_line(run_dir, capsys):
    """Errors of the data module or model come out inside jsonargparse's Union message, or late."""
    with pytest.raises(SystemExit, match="^mrl-vision fit: error: data root '/no/such/root' does not exist$"):
        cli(["fit", *QUICKSTART_ARGS[2:], "--data", "mrl_vision.data.ImageFolderDataModule",
             "--data.init_args.root", "/no/such/root"])
    with pytest.raises(SystemExit, match="input size 8 px is smaller"):
        cli(["fit", *QUICKSTART_ARGS, "--data.init_args.image_size", "8"])
    with pytest.raises(SystemExit, match=r"top_k values must be integers >= 1, got 0"):
        cli(["fit", *QUICKSTART_ARGS, "--model.top_k", "[0]"])
    with pytest.raises(ValueError, match="top_k values must be integers >= 1"):
        MatryoshkaAccuracy([8], 10, top_k=[1, 0])


def test_help_lists_every_command(capsys):
    """`mrl-vision --help` does not list the tools beside the Lightning subcommands."""
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "prepare", "truncate", "report", "convert-reference"):
        assert f"  {command}" in out


# ----------------------------------------------------------------------------- what users expect
def test_tensorboard_logger_works(run_dir):
    """`--trainer.logger TensorBoardLogger` fails (tensorboard not installed)."""
    c = cli(["fit", *QUICKSTART_ARGS, "--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "tb",
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"])
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").rglob("*"))
    assert c.trainer.global_step == 1


def test_every_trainer_config_fits_the_cascade():
    """A config without AdaptiveClassificationCallback: predict --model.adaptive_predict has no thresholds."""
    paths = [CONFIG_DIR / "quickstart.yaml", CONFIG_DIR / "quickstart_ffcv.yaml", *sorted((CONFIG_DIR / "trainer").glob("*.yaml"))]
    for path in paths:
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer", {})
        if "callbacks" not in trainer and path.name == "ddp.yaml":
            continue  # goes after a recipe: keeps its callbacks
        assert any(cb["class_path"].endswith("AdaptiveClassificationCallback") for cb in trainer["callbacks"]), path


def test_fit_prints_the_validation_table(fitted, capsys):
    """The end of fit shows no per-size validation table (as test does)."""
    report = next(cb for cb in fitted.trainer.callbacks if isinstance(cb, AccuracyReport))
    assert [r["dims"] for r in report.rows] == TEST_RESNET_DIMS
    log_dir = Path(fitted.trainer.log_dir)
    if not log_dir.is_absolute():
        log_dir = fitted.checkpoint.parents[1]
    rows = _rows(log_dir / "val_accuracy.csv")
    metrics = fitted.trainer.callback_metrics
    assert [float(r["top1"]) for r in rows] == pytest.approx([100 * float(metrics[f"val/top1@{m}"]) for m in TEST_RESNET_DIMS])


# ----------------------------------------------------------------------------- reports and curves
def test_report_keeps_runs_whose_folders_share_a_name(fitted, tmp_path):
    """Two runs whose folders end in the same name: one is dropped from every output."""
    run = fitted.checkpoint.parents[1]
    a, b = tmp_path / "mrl" / "version_0", tmp_path / "again" / "version_0"
    for dst in (a, b):
        shutil.copytree(run, dst)
    written = write_report([a, b], tmp_path / "report")
    table = _rows(written["csv"])
    assert list(table[0]) == ["dims", "MRL (mrl/version_0)", "MRL (again/version_0)"]
    assert [read_run_results(d)["label"] for d in (a, b)] == ["MRL", "MRL"]


def test_adaptive_curve_at_test_is_one_population(fitted, run_dir):
    """At test with validation-fitted thresholds, the fixed sizes in the curve are measured on half of
    the test set while the chosen cascade is measured on all of it."""
    c = cli(["test", *QUICKSTART_ARGS, "--ckpt_path", str(fitted.checkpoint)])
    cb = next(cb for cb in c.trainer.callbacks if isinstance(cb, AdaptiveClassificationCallback))
    assert cb.result is not None
    curve = _rows(Path(c.trainer.log_dir) / "adaptive_test_curve.csv")
    fixed = {int(float(r["expected_dims"])): float(r["top1"]) for r in curve if r["kind"] == "fixed"}
    metrics = c.trainer.callback_metrics
    assert fixed == pytest.approx({m: 100 * float(metrics[f"test/top1@{m}"]) for m in TEST_RESNET_DIMS}, abs=1e-3)


def test_predict_on_a_flat_folder_names_files_and_classes(fitted, run_dir):
    """`predict` on a flat folder of unlabeled images fails, or predictions.csv does not say which file
    each row is and which class each prediction names."""
    digits = tuple(str(d) for d in range(10))
    root = write_jpeg_tree(run_dir / "digits", classes=digits, train_per_class=1, val_per_class=1)
    flat = run_dir / "unlabeled"
    flat.mkdir()
    for i, src in enumerate(sorted((root / "val").rglob("*.jpg"))[:3]):
        shutil.copy(src, flat / f"img_{i}.jpg")
    (flat / ".hidden.jpg").write_bytes(b"not an image")  # hidden files are not images to predict
    c = cli(["predict", *QUICKSTART_ARGS[2:], "--data", "mrl_vision.data.ImageFolderDataModule",
             "--data.init_args.root", str(root), "--data.init_args.predict_dir", str(flat),
             "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
             "--data.init_args.batch_size", "2", "--ckpt_path", str(fitted.checkpoint)])
    rows = _rows(Path(c.trainer.log_dir) / "predictions.csv")
    assert [r["sample"] for r in rows] == ["img_0.jpg", "img_1.jpg", "img_2.jpg"]
    assert "target" not in rows[0]
    assert all(r["class@96"] == digits[int(r["pred@96"])] for r in rows)
