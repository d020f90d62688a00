"""MatryoshkaModel on its own: loading what ``fit`` writes (today's and the pre-split checkpoint
format), save_pretrained/from_pretrained, pure embedders, timm's optimizer hooks, and the CLI taking a
saved model folder wherever it takes ``--ckpt_path``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART_ARGS, TEST_RESNET_DIMS, TEST_RESNET_WIDTH, short_quickstart_fit

from mrl_vision import MatryoshkaClassifier, MatryoshkaModel
from mrl_vision.callbacks import AccuracyReport
from mrl_vision.cli import cli, main
from mrl_vision.data import QuickstartDataModule
from mrl_vision.data.quickstart import MNIST_MEAN, MNIST_STD
from mrl_vision.model import upgrade_config

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the logging interval")

BASE = QUICKSTART_ARGS


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A short real `mrl-vision fit` (2 steps, 2 validation batches: the cascade is fitted) and its task."""
    work = tmp_path_factory.mktemp("fit")
    c = short_quickstart_fit(work)
    return c.model.cpu().eval(), c.checkpoint, work


def _digits(n: int = 6) -> torch.Tensor:
    dm = QuickstartDataModule(batch_size=n)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))[0]


def _old_format(ckpt: Path, out: Path) -> Path:
    """The checkpoint as mrl-vision wrote it before the model was split from the task: the network's
    keys at the top (backbone.*, head.*, adaptive_thresholds) and the ``nesting`` hyperparameter."""
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    data["state_dict"] = {k[len("model."):] if k.startswith("model.") else k: v for k, v in data["state_dict"].items()}
    hp = dict(data["hyper_parameters"])
    hp["nesting"] = hp.pop("dims")
    for key in ("blurpool", "class_names", "input_size", "mean", "std", "layer_decay"):
        hp.pop(key, None)
    data["hyper_parameters"] = hp
    torch.save(data, out)
    return out


# ----------------------------------------------------------------------------- loading fit's checkpoints
def test_from_checkpoint_gives_the_task_logits(fitted):
    """from_checkpoint differs from the Lightning module it came from, or keeps what the data linked."""
    task, ckpt, _ = fitted
    model = MatryoshkaModel.from_checkpoint(ckpt)
    assert not model.training and model.dims == TEST_RESNET_DIMS and model.head_kind == "mrl"
    assert model.class_names == [str(i) for i in range(10)] and model.input_size == 32
    assert model.mean == pytest.approx(list(MNIST_MEAN)) and model.std == pytest.approx(list(MNIST_STD))
    x = _digits()
    with torch.no_grad():
        torch.testing.assert_close(model(x), task(x))
        loaded = MatryoshkaClassifier.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
        torch.testing.assert_close(model(x), loaded(x))
    assert not bool(torch.isnan(model.adaptive_thresholds).any())  # the cascade fitted during validation
    torch.testing.assert_close(model.adaptive_thresholds, task.model.adaptive_thresholds)


def test_pre_split_checkpoint_loads(fitted, tmp_path, run_dir):
    """A checkpoint written before the split (top-level keys, `nesting`) no longer loads, in Python or
    through `mrl-vision test --ckpt_path`."""
    task, ckpt, _ = fitted
    old = _old_format(ckpt, tmp_path / "old.ckpt")
    model = MatryoshkaModel.from_checkpoint(old)
    x = _digits()
    with torch.no_grad():
        torch.testing.assert_close(model(x), task(x))
    c = cli(["test", *BASE, "--trainer.limit_test_batches", "1", "--ckpt_path", str(old)])
    assert c.model.model.dims == TEST_RESNET_DIMS
    with torch.no_grad():
        torch.testing.assert_close(c.model.cpu().eval()(x), task(x))


def test_upgrade_config_maps_old_spellings():
    """Old hyperparameters (nesting, ff_dim) are not mapped to dims and head ff."""
    assert upgrade_config({"nesting": [8, 16], "head": "mrl"}) == {"dims": [8, 16], "head": "mrl"}
    assert upgrade_config({"nesting": None, "ff_dim": 16, "head": "mrl_e"}) == {"dims": [16], "head": "ff"}
    assert upgrade_config({"ff_dim": 8, "head": "ff_projection"}) == {"dims": [8], "head": "ff_projection"}
    assert upgrade_config({"ff_dim": None, "dims": [4]}) == {"dims": [4]}


# ----------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_round_trip(fitted, tmp_path):
    """save_pretrained -> from_pretrained loses weights, sizes, thresholds, class names or
    normalisation, or leaves temporary files behind."""
    task, _, _ = fitted
    out = task.model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "mrl-vision-model" and config["dims"] == TEST_RESNET_DIMS
    assert config["backbone"] == "test_resnet" and config["num_classes"] == 10
    loaded = MatryoshkaModel.from_pretrained(out)
    assert not loaded.training
    for attr in ("dims", "class_names", "input_size", "mean", "std", "head_kind", "num_classes"):
        assert getattr(loaded, attr) == getattr(task.model, attr), attr
    for key, value in task.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = _digits()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task(x))
        assert torch.equal(loaded.predict_adaptive(x)[0], task.model.predict_adaptive(x)[0])
    assert MatryoshkaModel.load(out).dims == loaded.dims


def test_from_pretrained_errors(tmp_path):
    """A folder without config.json, a foreign config or missing weights load silently or unclearly."""
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MatryoshkaModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an mrl-vision model config"):
        MatryoshkaModel.from_pretrained(tmp_path)
    model = MatryoshkaModel("test_resnet", num_classes=3)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MatryoshkaModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MatryoshkaModel.from_checkpoint(tmp_path / "none.ckpt")


# ----------------------------------------------------------------------------- embedder, ff, arguments
def test_pure_embedder():
    """A model without num_classes does not embed, or classifies instead of failing clearly."""
    torch.manual_seed(0)
    model = MatryoshkaModel("test_resnet").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = model(x)
        assert z.shape == (2, TEST_RESNET_WIDTH) and model.dims == TEST_RESNET_DIMS
        torch.testing.assert_close(model.embed(x, 16), z[:, :16])
    with pytest.raises(ValueError, match="pure embedder"):
        model.predict(x)
    with pytest.raises(ValueError, match="pure embedder"):
        model.predict_adaptive(x, thresholds=[0.5] * 4)


def test_pure_embedder_round_trip(tmp_path):
    """An embedder with its own dims does not survive save_pretrained."""
    model = MatryoshkaModel("test_resnet", dims=[4, 32, 96]).eval()
    loaded = MatryoshkaModel.from_pretrained(model.save_pretrained(tmp_path / "emb"))
    assert loaded.head is None and loaded.dims == [4, 32, 96]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=3, class_names=["a", "b"]), "2 class names for num_classes=3"),
        (dict(class_names=["a"]), "num_classes=None"),
        (dict(num_classes=3, input_size=0), "input_size"),
        (dict(num_classes=3, mean=[0.5, 0.5]), "mean must hold 1 or 3"),
        (dict(num_classes=3, head="ff", dims=[8, 16]), r"one size.*\[8, 16\]"),
        (dict(num_classes=3, head="mlp"), "'mlp'"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    """A bad MatryoshkaModel argument is accepted, or its error does not name it."""
    with pytest.raises(ValueError, match=match):
        MatryoshkaModel("test_resnet", **kwargs)


def test_optimizer_hooks_are_forwarded_with_prefix():
    """no_weight_decay/group_matcher do not name the backbone's parameters under `backbone.`."""
    model = MatryoshkaModel("test_vit", num_classes=3)
    assert {"backbone.pos_embed", "backbone.cls_token"} <= model.no_weight_decay()
    matcher = model.group_matcher()
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]

    stem = matcher["stem"]
    assert any(re.match(stem, n) for n in names if "patch_embed" in n)
    blocks = matcher["blocks"]
    pattern = blocks if isinstance(blocks, str) else blocks[0][0]
    assert any(re.match(pattern, n) for n in names if ".blocks." in n)
    assert not any(re.match(stem, n) for n in names if ".blocks." in n)


# ----------------------------------------------------------------------------- CLI with a saved folder
def _accuracy_rows(c) -> list[dict]:
    return next(cb for cb in c.trainer.callbacks if isinstance(cb, AccuracyReport)).rows


def test_cli_takes_a_saved_model_folder(fitted, run_dir):
    """test/validate/predict/truncate with --ckpt_path DIR do not give the checkpoint's results."""
    task, ckpt, _ = fitted
    saved = task.model.save_pretrained(run_dir / "saved")
    args = [*BASE, "--trainer.limit_test_batches", "2"]
    from_ckpt = _accuracy_rows(cli(["test", *args, "--ckpt_path", str(ckpt)]))
    from_dir = _accuracy_rows(cli(["test", *args, "--ckpt_path", str(saved)]))
    assert from_dir == from_ckpt and [r["dims"] for r in from_dir] == TEST_RESNET_DIMS
    v = cli(["validate", *BASE, "--trainer.limit_val_batches", "1", "--ckpt_path", str(saved)])
    assert "val/top1@8" in v.trainer.callback_metrics
    p = cli(["predict", *BASE, "--ckpt_path", str(saved)])
    with torch.no_grad():
        expected = task(_digits(16)).argmax(-1)  # [G, 16]
    rows = list(csv.DictReader(open(p.trainer.log_dir + "/predictions.csv")))
    assert len(rows) == 500 and [int(r["pred@96"]) for r in rows[:16]] == expected[-1].tolist()
    main(["truncate", "--ckpt_path", str(saved), "--out", str(run_dir / "trunc"), "--sizes", "8", "96",
          *BASE[:4], "--data.init_args.batch_size", "250"])
    assert (run_dir / "trunc" / "truncation.csv").is_file()


def test_fit_refuses_a_saved_model_folder(fitted, run_dir):
    """fit --ckpt_path DIR starts training or fails without saying that resuming needs a checkpoint."""
    task, _, _ = fitted
    saved = task.model.save_pretrained(run_dir / "saved")
    with pytest.raises(SystemExit, match="resumes from a Lightning checkpoint"):
        cli(["fit", *BASE, "--ckpt_path", str(saved)])


# ----------------------------------------------------------------------------- embeddings after each block
@pytest.mark.parametrize("backbone", ["test_vit", "deit_tiny_patch16_224"])
def test_layer_features_last_block_is_the_embedding(backbone):
    """The pooled embedding after the last block differs from features(x), a subset of blocks from the
    matching rows of every block, or a shallow block's embedding is not pooled like the last one."""
    torch.manual_seed(0)
    model = MatryoshkaModel(backbone, num_classes=3, input_size=32).eval()
    depth = model.depth
    assert depth == len(model.backbone.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        every = model.layer_features(x)
        some = model.layer_features(x, [2, depth])
        z = model.features(x)
        # by hand: run the first two blocks, the final norm, then the model's pooling of its prefix token
        b = model.backbone
        tokens = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
        tokens = b.blocks[1](b.blocks[0](tokens))
        shallow = b.forward_head(b.norm(tokens), pre_logits=True)
    assert every.shape == (depth, 2, model.width)
    torch.testing.assert_close(every[-1], z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(some, every[[1, depth - 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every[1], shallow, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(every[0], every[-1])


def test_layer_features_refuses_cnns_and_bad_layers():
    """A CNN (stages of other widths) is embedded per block, or bad block counts pass unnamed."""
    cnn = MatryoshkaModel("test_resnet", num_classes=3)
    assert cnn.depth is None
    with pytest.raises(ValueError, match="test_resnet"):
        cnn.layer_features(torch.randn(1, 3, 32, 32))
    vit = MatryoshkaModel("test_vit", num_classes=3, input_size=32)
    for bad in ([0], [7], [3, 2], [2, 2], [], [True]):
        with pytest.raises(ValueError, match=r"layers must be increasing block counts in \[1, 6\]"):
            vit.layer_features(torch.randn(1, 3, 32, 32), bad)


def test_truncate_keeps_the_first_blocks_and_saves_shallow(tmp_path):
    """A model cut to k blocks embeds otherwise than its k-th block did, still runs the dropped blocks,
    or comes back from save_pretrained at full depth."""
    torch.manual_seed(0)
    model = MatryoshkaModel("test_vit", num_classes=3, input_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        after_two = model.layer_features(x, [2])[0]
        logits_two = model.head(after_two)
    assert model.truncate(2) is model and model.depth == 2 and len(model.backbone.blocks) == 2
    assert model.config["layers"] == 2
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), after_two, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), logits_two, atol=1e-5, rtol=1e-5)
    again = MatryoshkaModel.from_pretrained(model.save_pretrained(tmp_path / "shallow")).eval()
    assert again.depth == 2 and again.config["layers"] == 2
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits_two, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    built = MatryoshkaModel("test_vit", num_classes=3, input_size=32, layers=2)
    assert built.depth == 2 and built.config["layers"] == 2
    with pytest.raises(ValueError, match=r"block count in \[1, 2\].*got 3"):
        model.truncate(3)
    with pytest.raises(ValueError, match="test_resnet"):
        MatryoshkaModel("test_resnet", num_classes=3, layers=2)
