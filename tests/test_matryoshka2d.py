"""2D Matryoshka (issue 13): the loss against a hand computation, the KL term, the seeded draw of blocks,
validation at the door, the task's training and (block, size) grid through the real CLI."""

from __future__ import annotations

import copy
import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import QUICKSTART_CONFIG
from mrl_vision import MatryoshkaClassifier, MatryoshkaModel
from mrl_vision.losses import MatryoshkaLoss
from mrl_vision.matryoshka2d import Matryoshka2d, Matryoshka2dLoss, kl_distillation, layer_weight, resolve_eval_layers

DIMS = [8, 16, 32]


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    p = (teacher / t).softmax(-1)
    return t * (p * (p.log() - (student / t).log_softmax(-1))).sum(-1).mean()


def _hand_ce(logits: torch.Tensor, y: torch.Tensor, weights: list[float], keep: list[bool] | None = None) -> torch.Tensor:
    keep = keep or [True] * len(weights)
    return sum(w * F.cross_entropy(logits[g], y) for g, (w, k) in enumerate(zip(weights, keep)) if k)


@pytest.mark.parametrize("kl_on", ["embeddings", "logits"])
def test_loss_equals_the_hand_computation(kl_on):
    """The total is not last x MRL(last) + prior x mean_l w(l) MRL(l) + kl x sum_l T KL(teacher || student)."""
    torch.manual_seed(0)
    k, g, n, c, d = 3, len(DIMS), 5, 4, 32
    logits, emb, y = torch.randn(k, g, n, c), torch.randn(k, n, d), torch.randint(0, c, (n,))
    weights = [1.0, 0.5, 2.0]
    opts = {"layer_weighting": "linear", "last_layer_weight": 0.7, "prior_layers_weight": 1.3, "kl_weight": 0.4,
            "kl_temperature": 0.5, "kl_on": kl_on}
    loss_fn = Matryoshka2dLoss(MatryoshkaLoss(g, weights), depth=6, dims=DIMS, options=opts)
    total, parts = loss_fn(logits, emb, [2, 4, 6], y)
    last = _hand_ce(logits[2], y, weights)
    prior = (_hand_ce(logits[0], y, weights) / 3 + _hand_ce(logits[1], y, weights) / 5) / 2
    src = emb if kl_on == "embeddings" else logits
    kl = _hand_kl(src[0], src[2], 0.5) + _hand_kl(src[1], src[2], 0.5)
    torch.testing.assert_close(parts["last"], last)
    torch.testing.assert_close(parts["prior"], prior)
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(total, 0.7 * last + 1.3 * prior + 0.4 * kl)


def test_pairs_train_only_their_sizes():
    """Fixed (block, size) pairs train other sizes of that block too, or not at every step."""
    torch.manual_seed(1)
    logits, emb, y = torch.randn(3, 3, 6, 4), torch.randn(3, 6, 32), torch.randint(0, 4, (6,))
    loss_fn = Matryoshka2dLoss(MatryoshkaLoss(3), depth=6, dims=DIMS, options={"pairs": [[2, 8], [4, 8], [4, 32]], "kl_weight": 0})
    assert loss_fn.step_layers(0, 0) == loss_fn.step_layers(3, 7) == [2, 4, 6]
    _, parts = loss_fn(logits, emb, [2, 4, 6], y)
    expected = (_hand_ce(logits[0], y, [1] * 3, [True, False, False]) + _hand_ce(logits[1], y, [1] * 3, [True, False, True])) / 2
    torch.testing.assert_close(parts["prior"], expected)


def test_kl_is_zero_for_equal_inputs_and_spares_the_teacher():
    """The KL term is not zero when student equals teacher, or a gradient reaches the teacher."""
    a = torch.randn(4, 16)
    assert float(kl_distillation(a, a.clone(), 0.3)) == pytest.approx(0.0, abs=1e-6)
    student, teacher = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    value = kl_distillation(student, teacher, 0.3)
    assert float(value.detach()) > 0
    torch.testing.assert_close(value, _hand_kl(student, teacher, 0.3))
    value.backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
    # through the whole loss: the last block's outputs only learn from its own cross-entropy
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    emb = torch.randn(2, 4, 8, requires_grad=True)
    loss_fn = Matryoshka2dLoss(MatryoshkaLoss(3), depth=4, dims=DIMS, options={"last_layer_weight": 0.0})
    loss_fn(logits, emb, [1, 4], torch.randint(0, 5, (4,)))[0].backward()
    assert emb.grad[1].abs().sum() == 0 and logits.grad[1].abs().sum() == 0 and emb.grad[0].abs().sum() > 0


def test_drawn_blocks_follow_the_seed():
    """The blocks drawn per step change between two models of one seed, repeat too little across steps,
    or ignore n_layers_per_step / prior_layers."""
    def draws(**opts):
        loss_fn = Matryoshka2dLoss(MatryoshkaLoss(3), depth=12, dims=DIMS, options=opts)
        return [loss_fn.sample_layers(e, b) for e in range(2) for b in range(20)]

    one, again, other = draws(seed=5), draws(seed=5), draws(seed=6)
    assert one == again and one != other
    assert all(len(s) == 1 and 1 <= s[0] <= 11 for s in one)
    assert len({s[0] for s in one}) >= 6  # spread over the blocks, not one block
    two = draws(seed=5, n_layers_per_step=2, prior_layers=[3, 6, 9])
    assert all(len(s) == 2 and s == sorted(s) and set(s) <= {3, 6, 9} for s in two)
    assert draws(seed=5, n_layers_per_step=-1)[0] == list(range(1, 12))
    torch.manual_seed(123)  # the default seed is the process's torch seed (seed_everything)
    assert Matryoshka2dLoss(MatryoshkaLoss(3), depth=12, dims=DIMS).options.seed == 123


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prior_layers": [3, 12]}, r"block 12 in prior_layers is out of range: earlier blocks are 1\.\.11"),
        ({"pairs": [[0, 8]]}, r"block 0 in pairs is out of range"),
        ({"pairs": [[3, 24]]}, r"size 24 in pairs is not one of the model's sizes \[8, 16, 32\]"),
        ({"n_layers_per_step": 0}, r"n_layers_per_step must be -1 .* got 0"),
        ({"kl_temperature": 0}, r"kl_temperature must be finite and > 0, got 0"),
        ({"layer_weighting": "cubic"}, r"unknown layer_weighting 'cubic'"),
        ({"kl_on": "tokens"}, r"unknown kl_on 'tokens'"),
        ({"prior_weight": 1}, r"unknown matryoshka_2d option\(s\) \['prior_weight'\]"),
    ],
)
def test_bad_options_fail_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        Matryoshka2dLoss(MatryoshkaLoss(3), depth=12, dims=DIMS, options=options)


def test_task_refuses_cnns_and_bad_eval_layers():
    """A CNN backbone or an eval block out of range is not refused at construction, naming the model / range."""
    with pytest.raises(ValueError, match=r"forward_intermediates and blocks of one width .*'test_resnet'"):
        MatryoshkaClassifier(num_classes=3, backbone="test_resnet", matryoshka_2d={})
    with pytest.raises(ValueError, match=r"eval_layers must be distinct block counts in \[1, 6\], got \[2, 7\]"):
        MatryoshkaClassifier(num_classes=3, backbone="test_vit", input_size=32, eval_layers=[2, 7])
    assert resolve_eval_layers([4, 2], 6) == [2, 4, 6] and resolve_eval_layers(None, 3) == [1, 2, 3]
    assert layer_weight(3, "log") == pytest.approx(1 / (1 + math.log(4)))


@pytest.mark.parametrize("head", ["mrl", "mrl_e"])
def test_one_pass_grid_equals_truncated_models(head):
    """The (block, size) logits of one pass differ from those of the model truncated to that block, or
    embed/predict(layers=k) from the truncated model's."""
    torch.manual_seed(0)
    model = MatryoshkaModel("test_vit", num_classes=5, head=head, input_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        grid, emb = model.layer_outputs(x, [2, 4, 6], flip_tta=True)
        assert grid.shape == (3, len(model.dims), 3, 5) and emb.shape == (3, 3, model.width)
        torch.testing.assert_close(grid[-1], model.eval_logits(x, flip_tta=True), atol=1e-5, rtol=1e-5)
        deep_embed = model.embed(x, 16, layers=4)
        deep_pred = model.predict(x, 8, layers=2)

    for k, layer in enumerate([2, 4]):
        cut = copy.deepcopy(model).truncate(layer).eval()
        with torch.no_grad():
            torch.testing.assert_close(cut.eval_logits(x, flip_tta=True), grid[k], atol=1e-5, rtol=1e-5)
            if layer == 4:
                torch.testing.assert_close(cut.embed(x, 16), deep_embed, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(cut.predict(x, 8), deep_pred)


def _read_metrics(log_dir: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    with open(log_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            found.update({k: float(v) for k, v in row.items() if v})
    return found


def test_fit_logs_the_grid_through_the_cli(tmp_path, monkeypatch):
    """`mrl-vision fit` with the 2D options (the quickstart, a tiny ViT) does not train with the 2D loss,
    log the (block, size) grid, or keep the options (with the seed drawn) in its checkpoint."""
    from mrl_vision.cli import cli, truncate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mrl-vision"])
    c = cli(["fit", "--config", str(QUICKSTART_CONFIG), "--model.backbone", "test_vit",
             "--model.optimizer", "adamw", "--model.lr", "1e-3",
             "--model.matryoshka_2d", '{"n_layers_per_step": 2, "kl_on": "logits"}', "--model.eval_layers", "[2, 4]",
             "--data.init_args.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
             "--trainer.enable_progress_bar", "false"])
    metrics = _read_metrics(Path(c.trainer.log_dir))
    dims = c.model.model.dims
    assert {f"val/top1@L{k}/{m}" for k in (2, 4) for m in dims} <= set(metrics)
    assert "val/top1@L6/8" not in metrics and f"val/top1@{dims[-1]}" in metrics  # the last block keeps the 1D keys
    assert {"train/loss_last", "train/loss_prior", "train/loss_kl"} <= set(metrics) and metrics["train/loss_kl"] > 0
    ckpt = c.trainer.checkpoint_callback.last_model_path
    task = MatryoshkaClassifier.load_from_checkpoint(ckpt)
    assert task.hparams.matryoshka_2d["n_layers_per_step"] == 2 and task.hparams.matryoshka_2d["seed"] == 0
    assert task.layer_loss.options == c.model.layer_loss.options and task.eval_layers == [2, 4, 6]
    # the baseline of the README: the model cut to 2 blocks, then linear probes on its embedding
    out = tmp_path / "cut2"
    rows = truncate(["--ckpt_path", ckpt, "--out", str(out), "--layers", "2", "--sizes", "8", "64",
                "--fit-split", "val", "--device", "cpu"])
    meta = __import__("json").loads((out / "truncation.json").read_text())
    assert meta["layers"] == 2 and [r["dims"] for r in rows] == [8, 64]
    with pytest.raises(SystemExit):  # a block count out of range: a one-line error, no traceback
        truncate(["--ckpt_path", ckpt, "--out", str(tmp_path / "cut9"), "--layers", "9", "--device", "cpu"])
