"""End-to-end tests through the real ``mrl-vision`` entry point (LightningCLI), on the quickstart
digits with timm's tiny ``test_resnet`` (width 96, dims 8..96)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import CONFIG_DIR, JPEG_CLASSES, QUICKSTART_ARGS, QUICKSTART_CONFIG, TEST_RESNET_DIMS, short_quickstart_fit
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mrl_vision.callbacks import AccuracyReport, PredictionWriter
from mrl_vision.cli import cli, quickstart_config, with_default_config
from mrl_vision.data import ImageFolderDataModule, MatryoshkaDataModule, QuickstartDataModule
from mrl_vision.data.quickstart import MNIST_MEAN, MNIST_STD, load_mnist_digits
from mrl_vision.heads import FixedFeatureHead, MatryoshkaHead
from mrl_vision import MatryoshkaClassifier

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

Q = str(QUICKSTART_CONFIG)
BASE = QUICKSTART_ARGS
ALL_CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint from a short real fit (1 epoch, 2 train batches, 2 val batches)."""
    work = tmp_path_factory.mktemp("fit")
    c = short_quickstart_fit(work)
    assert c.trainer.global_step == 2
    ckpt = c.checkpoint
    assert ckpt.is_file() and ckpt.name == "last.ckpt"
    assert ckpt.parent == work / "runs" / "quickstart" / "version_0" / "checkpoints"
    return ckpt


def _first_test_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n quickstart test images (seed 0), straight from the data module."""
    dm = QuickstartDataModule(batch_size=n, seed=0)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


def _reference_logits(ckpt: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = MatryoshkaClassifier.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    x, y = _first_test_images(n)
    with torch.no_grad():
        return model(x), y


# ----------------------------------------------------------------------------- fast_dev_run
def test_fit_fast_dev_run(run_dir):
    """`mrl-vision fit` on the quickstart with test_resnet does not run one training step."""
    c = cli(["fit", *BASE, "--trainer.fast_dev_run", "1"])
    assert isinstance(c.datamodule, QuickstartDataModule)
    # linked from the data module: the class count, the class names, the input size, the normalisation
    assert c.model.hparams.num_classes == c.model.model.num_classes == 10
    assert c.model.model.class_names == c.datamodule.class_names and len(c.datamodule.class_names) == 10
    assert c.model.model.input_size == c.datamodule.input_size
    assert c.model.model.mean == pytest.approx(list(c.datamodule.mean))
    assert c.model.model.std == pytest.approx(list(c.datamodule.std))
    assert c.model.hparams.backbone == "test_resnet" and c.model.model.dims == TEST_RESNET_DIMS
    assert c.trainer.global_step == 1 and c.trainer.state.finished
    # the config's optimisation reached the optimizer: SGD, wd 5e-4 on weights, none on 1-D params
    # (timm's parameter groups: [no decay, decay])
    opt = c.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    wd = float(yaml.safe_load(QUICKSTART_CONFIG.read_text())["model"]["weight_decay"])
    assert wd > 0 and [g["weight_decay"] for g in opt.param_groups] == [0.0, wd]
    assert all(p.ndim <= 1 for p in opt.param_groups[0]["params"])


def test_test_fast_dev_run(run_dir):
    """`mrl-vision test` with fast_dev_run does not evaluate every size (AccuracyReport.rows)."""
    c = cli(["test", *BASE, "--trainer.fast_dev_run", "1", "--allow_untrained", "true"])
    reports = [cb for cb in c.trainer.callbacks if isinstance(cb, AccuracyReport)]
    assert len(reports) == 1  # added by `mrl-vision test`
    rows = reports[0].rows
    assert [r["dims"] for r in rows] == TEST_RESNET_DIMS
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in rows)


def test_predict_fast_dev_run(run_dir):
    """`mrl-vision predict` with fast_dev_run does not write one batch of predictions."""
    c = cli(["predict", *BASE, "--trainer.fast_dev_run", "1", "--allow_untrained", "true"])
    writers = [cb for cb in c.trainer.callbacks if isinstance(cb, PredictionWriter)]
    assert len(writers) == 1 and writers[0].path is not None and writers[0].path.is_file()
    rows = _read_csv(writers[0].path)
    assert len(rows) == 16


# ----------------------------------------------------------------------------- test / predict reports
def test_test_writes_accuracy_report(run_dir, trained):
    """`mrl-vision test` from a checkpoint does not write test_accuracy.csv/.png with the right numbers."""
    c = cli(["test", *BASE, "--trainer.limit_test_batches", "2", "--ckpt_path", str(trained)])
    log_dir = (run_dir / c.trainer.log_dir).resolve()
    assert log_dir == run_dir / "runs" / "quickstart" / "version_0"
    csv_path, png_path = log_dir / "test_accuracy.csv", log_dir / "test_accuracy.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(csv_path)
    assert list(rows[0]) == ["dims", "top1", "top5"]
    assert [int(r["dims"]) for r in rows] == TEST_RESNET_DIMS
    # independent computation: the checkpoint's accuracy on the same 32 test images
    logits, y = _reference_logits(trained, 32)
    for g, r in enumerate(rows):
        top5 = logits[g].topk(5, dim=-1).indices
        top1_ref = 100.0 * float((logits[g].argmax(-1) == y).float().mean())
        top5_ref = 100.0 * float((top5 == y[:, None]).any(-1).float().mean())
        assert float(r["top1"]) == pytest.approx(top1_ref, abs=1e-3)
        assert float(r["top5"]) == pytest.approx(top5_ref, abs=1e-3)


def test_predict_writes_predictions_csv(run_dir, trained):
    """`mrl-vision predict` does not write every image's per-size prediction, confidence and class name."""
    c = cli(["predict", *BASE, "--trainer.limit_predict_batches", "2", "--ckpt_path", str(trained)])
    path = (run_dir / c.trainer.log_dir / "predictions.csv").resolve()
    assert path.parent == run_dir / "runs" / "quickstart" / "version_0"
    rows = _read_csv(path)
    m = TEST_RESNET_DIMS
    assert list(rows[0]) == (["index", "target"] + [f"pred@{s}" for s in m] + [f"conf@{s}" for s in m]
                             + ["target_class"] + [f"class@{s}" for s in m])
    assert all(r["target_class"] == r["target"] and r["class@8"] == r["pred@8"] for r in rows)  # digits '0'..'9'
    assert [int(r["index"]) for r in rows] == list(range(32))
    logits, y = _reference_logits(trained, 32)
    probs = logits.softmax(-1)
    assert [int(r["target"]) for r in rows] == y.tolist()
    for g, s in enumerate(m):
        assert [int(r[f"pred@{s}"]) for r in rows] == logits[g].argmax(-1).tolist()
        conf = torch.tensor([float(r[f"conf@{s}"]) for r in rows])
        torch.testing.assert_close(conf, probs[g].max(-1).values, rtol=0, atol=6e-5)


# ----------------------------------------------------------------------------- configs
def test_default_config_is_the_quickstart(run_dir, capsys):
    """`mrl-vision fit` without --config does not use the embedded quickstart config."""
    assert with_default_config(["fit", "--x", "1"]) == ["fit", "--config", quickstart_config(), "--x", "1"]
    assert with_default_config(["fit", "-c", "a.yaml"]) == ["fit", "-c", "a.yaml"]
    assert Path(quickstart_config()).read_text() == QUICKSTART_CONFIG.read_text()
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    quick = yaml.safe_load(QUICKSTART_CONFIG.read_text())
    assert printed["data"]["class_path"] == "mrl_vision.data.QuickstartDataModule"
    assert printed["model"]["backbone"] == quick["model"]["backbone"]
    assert printed["trainer"]["max_epochs"] == quick["trainer"]["max_epochs"]


def _scalar_settings(cfg: dict) -> dict[str, object]:
    """Dotted keys of the scalar settings of a config file (model, data.init_args, trainer)."""
    out: dict[str, object] = {}
    for key, value in (cfg.get("model") or {}).items():
        if not isinstance(value, (dict, list)):
            out[f"model.{key}"] = value
    for key, value in ((cfg.get("data") or {}).get("init_args") or {}).items():
        if not isinstance(value, (dict, list)):
            out[f"data.init_args.{key}"] = value
    for key, value in (cfg.get("trainer") or {}).items():
        if not isinstance(value, (dict, list)):
            out[f"trainer.{key}"] = value
    return out


def _lookup(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_parses(path, run_dir, capsys):
    """A YAML under configs/ does not parse on top of the quickstart, or its settings are lost."""
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", Q, "--config", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    settings = _scalar_settings(yaml.safe_load(path.read_text()))
    assert settings, f"{path} sets nothing"
    for key, value in settings.items():
        assert _lookup(printed, key) == value, key


# file -> (head class, efficient, dims)
MRL_512 = [8, 16, 32, 64, 128, 256, 512]
MRL_2048 = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
MRL_384 = [8, 16, 32, 64, 128, 256, 384]
MODEL_CONFIGS = {
    "ff_resnet18.yaml": (FixedFeatureHead, False, [64], 512),
    "ff_resnet50.yaml": (FixedFeatureHead, False, [64], 2048),
    "ff_vit_small.yaml": (FixedFeatureHead, False, [64], 384),
    "mrl_resnet18.yaml": (MatryoshkaHead, False, MRL_512, 512),
    "mrl_resnet50.yaml": (MatryoshkaHead, False, MRL_2048, 2048),
    "mrl_vit_small.yaml": (MatryoshkaHead, False, MRL_384, 384),
    "mrle_resnet18.yaml": (MatryoshkaHead, True, MRL_512, 512),
    "mrle_resnet50.yaml": (MatryoshkaHead, True, MRL_2048, 2048),
    "mrle_vit_small.yaml": (MatryoshkaHead, True, MRL_384, 384),
    "mrl2d_vit_tiny.yaml": (MatryoshkaHead, False, [8, 16, 32, 64, 128, 192], 192),
}


def test_model_config_table_is_complete():
    """A model config was added or removed without updating the instantiation test."""
    assert sorted(p.name for p in (CONFIG_DIR / "model").glob("*.yaml")) == sorted(MODEL_CONFIGS)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_configs_instantiate(name, run_dir):
    """A model config does not build the head kind and dims it documents."""
    head_cls, efficient, dims, width = MODEL_CONFIGS[name]
    c = cli(["--config", Q, "--config", str(CONFIG_DIR / "model" / name)], run=False)
    model = c.model.model
    assert isinstance(model.head, head_cls)
    assert model.width == width and model.dims == dims
    assert getattr(model.head, "efficient", False) == efficient
    assert c.model.hparams.num_classes == model.num_classes == model.head.num_classes == 10
    assert (c.model.layer_loss is not None) == name.startswith("mrl2d")  # 2D Matryoshka selected in the file
    if name.startswith("mrl2d"):
        assert c.model.eval_layers == [3, 6, 9, 12] and model.depth == 12 and model.input_size == 32


@pytest.mark.parametrize("rel", ["data/imagefolder.yaml", "imagenet/resnet_imagefolder.yaml"])
def test_imagefolder_configs_instantiate(rel, run_dir, jpeg_tree):
    """An ImageFolder config does not build on an existing tree or link its class count to the model."""
    args = ["--config", Q, "--config", str(CONFIG_DIR / rel), "--data.init_args.root", str(jpeg_tree)]
    if rel.startswith("imagenet"):
        args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    c = cli(args, run=False)
    assert isinstance(c.datamodule, ImageFolderDataModule)
    assert c.datamodule.num_classes == 3 and c.model.hparams.num_classes == 3
    assert c.model.model.num_classes == 3 and c.model.model.head.num_classes == 3
    assert c.model.model.class_names == list(JPEG_CLASSES)
    if rel.startswith("imagenet"):
        assert c.model.model.dims == MRL_2048 and c.model.hparams.lr_schedule == "triangular"
        assert c.datamodule.batch_size == 512 and c.model.hparams.channels_last


def test_cpu_trainer_config_instantiates(run_dir):
    """configs/trainer/cpu.yaml does not build a CPU trainer logging to runs/cpu."""
    c = cli(["--config", Q, "--config", str(CONFIG_DIR / "trainer" / "cpu.yaml"),
             "--model.backbone", "test_resnet"], run=False)
    assert isinstance(c.trainer.accelerator, L.pytorch.accelerators.CPUAccelerator)
    assert c.trainer.logger.name == "cpu" and Path(c.trainer.logger.save_dir).name == "runs"


# ----------------------------------------------------------------------------- bad labels
class _DigitsWithBadLabel(MatryoshkaDataModule):
    """Eight real quickstart digits; one carries label 12 although there are 10 classes. A
    ``MatryoshkaDataModule``: the label check is its ``on_before_batch_transfer``."""

    class_names = [str(i) for i in range(10)]
    input_size, mean, std = 32, MNIST_MEAN, MNIST_STD
    batch_size, num_workers = 8, 0

    def __init__(self) -> None:
        super().__init__()
        images, labels = load_mnist_digits()
        x = images[:8].float()[:, None] / 255
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
        x = (x - MNIST_MEAN[0]) / MNIST_STD[0]
        y = labels[:8].clone()
        y[5] = 12
        self.data = TensorDataset(x.contiguous(), y)

    def dataset(self, split: str, evaluate: bool | None = None) -> TensorDataset:
        return self.data


def test_out_of_range_label_fails_clearly_in_fit(run_dir):
    """A label >= num_classes reaches cross-entropy instead of the data module's ValueError naming it."""
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"label 12 is outside \[0, 10\)"):
        trainer.fit(model, datamodule=_DigitsWithBadLabel())
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------- console script
def test_console_script_fit(tmp_path):
    """The installed `mrl-vision` console script fails on the default (quickstart) config."""
    script = Path(sys.executable).parent / "mrl-vision"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "mrl_vision.cli"]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(
        [*cmd, "fit", "--model.backbone", "test_resnet", "--trainer.fast_dev_run", "1",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "fast_dev_run" in proc.stdout + proc.stderr
