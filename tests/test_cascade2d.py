"""Tests of the 2D cascade (``mrl_vision.cascade2d``: early exit over (block, size) points ordered by
FLOPs) and its callback ``DepthWidthCascade``: FLOPs against FlopCounterMode on the plain forward,
chains and costs worked out by hand, fitted cascades on seeded structured data, errors that name the
bad value, and a short real fit of timm's tiny ``test_vit`` (6 blocks, width 64) on the quickstart digits."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from mrl_vision import MatryoshkaClassifier, MatryoshkaModel
from mrl_vision import adaptive as A
from mrl_vision import cascade2d as C
from mrl_vision.callbacks import DepthWidthCascade
from mrl_vision.data import QuickstartDataModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*sync_dist=True.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def _flops(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def _preds_from(correct: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Predictions that are right exactly where ``correct`` says so."""
    return torch.where(correct, labels.expand_as(correct), (labels + 1).expand_as(correct) % num_classes)


# ============================================================================= FLOPs
def test_block_flops_rise_with_depth_and_match_the_plain_forward():
    """block_flops does not grow by one equal block per block, or its full depth is not the backbone's
    forward as FlopCounterMode counts it; head_flops is not 2 m C; or counting cuts the model itself."""
    model = MatryoshkaModel("test_vit", num_classes=4, input_size=32, backbone_kwargs={"img_size": 32})
    x = torch.zeros(1, 3, 32, 32)
    flops = C.block_flops(model, list(range(1, 7)))
    steps = [b - a for a, b in zip(flops, flops[1:])]
    assert all(s > 0 for s in steps) and len(set(steps)) == 1, flops  # identical ViT blocks: equal increments
    assert flops[-1] == _flops(model.features, x)
    assert C.head_flops(model) == [2 * m * 4 for m in model.dims] == [64, 128, 256, 512]
    assert flops[-1] + sum(C.head_flops(model)) == _flops(model, x)  # the plain forward: backbone + every head
    assert C.block_flops(model, [6, 3]) == [flops[5], flops[2]]  # in the order asked
    assert model.depth == 6 and len(model.backbone.blocks) == 6  # counted on a copy
    with torch.no_grad():
        assert C.block_flops(model, [2], input_size=64)[0] > flops[1]  # 16 tokens instead of 4
    grid = C.CostGrid.from_model(model, [2, 6], views=2)
    assert grid.block_flops == (2 * flops[1], 2 * flops[5]) and grid.head_flops == (128, 256, 512, 1024)
    assert grid.full_flops == 2 * (flops[5] + 512)


def test_block_flops_need_an_image_size_and_blocks():
    """block_flops guesses an image size, or measures a CNN or bad blocks without a clear error."""
    with pytest.raises(ValueError, match="input_size"):
        C.block_flops(MatryoshkaModel("test_vit", num_classes=4), [2])
    vit = MatryoshkaModel("test_vit", num_classes=4, input_size=32)
    with pytest.raises(ValueError, match=r"\[1, 6\], got \[0\]"):
        C.block_flops(vit, [0])
    with pytest.raises(ValueError, match="input_size must be a positive integer.*-3"):
        C.block_flops(vit, [1], input_size=-3)
    with pytest.raises(ValueError, match="test_resnet"):
        C.block_flops(MatryoshkaModel("test_resnet", num_classes=4, input_size=32), [1])


# ============================================================================= costs and chains by hand
# Grid H: blocks (2, 4) costing 100 and 200 FLOPs, sizes (8, 16) whose heads cost 1 and 2.
GRID_H = C.CostGrid(layers=(2, 4), dims=(8, 16), block_flops=(100, 200), head_flops=(1, 2))


def test_costs_hand_computed():
    """A fixed point does not cost its blocks plus its head, or an exit does not count each block once
    and every head evaluated so far."""
    assert GRID_H.point_flops().tolist() == [[101.0, 102.0], [201.0, 202.0]]
    assert GRID_H.full_point == (4, 16) and GRID_H.full_flops == 202
    assert GRID_H.exit_flops([(2, 8), (2, 16), (4, 16)]) == [101, 103, 205]  # 100+1, 100+1+2, 200+1+2+2
    assert GRID_H.exit_flops([(2, 8), (4, 8), (4, 16)]) == [101, 202, 204]  # size 8 scored again at block 4
    assert GRID_H.exit_flops([[4, 8], [2, 16]]) == [201, 203]  # block 2 ran on the way to block 4


# Data on grid H, N = 4, labels 0..3: accuracies (2,8) 0.5, (2,16) 0.5 (dearer, no better), (4,8) 0.75,
# (4,16) 1.0, so the Pareto chain is (2,8) -> (4,8) -> (4,16), exiting at 101, 202, 204 FLOPs.
LABELS_H = torch.arange(4)
CORRECT_H = torch.tensor([[[1, 1, 0, 0], [1, 0, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]], dtype=torch.bool)
PREDS_H = _preds_from(CORRECT_H, LABELS_H)
CONF_H = torch.tensor([[[0.9, 0.4, 0.8, 0.3], [0.5] * 4], [[0.9, 0.9, 0.3, 0.2], [0.5] * 4]])


def test_pareto_chain_and_evaluation_hand_computed():
    """The default chain is not the fixed points' Pareto front by cost, or a cascade's accuracy,
    exits and expected FLOPs along it are not what they are by hand."""
    chain = C.pareto_chain(CONF_H, PREDS_H, LABELS_H, GRID_H)
    assert chain == [(2, 8), (4, 8), (4, 16)]
    conf, preds = C.chain_confidences(CONF_H, PREDS_H, GRID_H, chain)
    assert conf[1].tolist() == pytest.approx([0.9, 0.9, 0.3, 0.2]) and preds.shape == (3, 4)
    # thresholds 0.5, 0.5: sample 0 exits at (2,8) right, 1 at (4,8) right, 2 at (2,8) wrong, 3 at (4,16) right
    res = C.evaluate_cascade(CONF_H, PREDS_H, LABELS_H, GRID_H, chain, [0.5, 0.5])
    assert res.chain == chain and res.accuracy == 0.75
    assert res.exit_flops == [101, 202, 204] and res.exit_fractions == [0.5, 0.25, 0.25]
    assert res.expected_flops == pytest.approx(0.5 * 101 + 0.25 * 202 + 0.25 * 204)  # 152
    assert res.flops_fraction == pytest.approx(152 / 202) and res.full_flops == 202
    assert res.as_dict()["chain"] == [[2, 8], [4, 8], [4, 16]]
    # thresholds 0: everyone exits at the cheapest point; 1 (and confidences below 1): at the last
    cheap = C.evaluate_cascade(CONF_H, PREDS_H, LABELS_H, GRID_H, chain, [0.0, 0.0])
    assert (cheap.accuracy, cheap.expected_flops) == (0.5, 101)
    full = C.evaluate_cascade(CONF_H, PREDS_H, LABELS_H, GRID_H, chain, [1.0, 1.0])
    assert (full.accuracy, full.expected_flops) == (1.0, 204)


def test_chain_ends_at_the_full_model_even_when_a_shallow_point_wins():
    """The default chain ends at a shallow point that beat the full model on the calibration data (by
    chance, on a small set) instead of at the full model, the reference of the tolerance."""
    correct = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 1]], [[1, 1, 0, 0], [1, 1, 1, 0]]], dtype=torch.bool)
    chain = C.pareto_chain(CONF_H, _preds_from(correct, LABELS_H), LABELS_H, GRID_H)
    assert chain == [(2, 8), (2, 16), (4, 16)]  # (2, 16) is the most accurate; the full model still ends it


def test_single_point_front_is_followed_by_the_full_model():
    """When the cheapest point is already the most accurate, the default chain has no cascade to fit."""
    correct = torch.ones(2, 2, 4, dtype=torch.bool)
    chain = C.pareto_chain(CONF_H, _preds_from(correct, LABELS_H), LABELS_H, GRID_H)
    assert chain == [(2, 8), (4, 16)]
    fit = C.fit_cascade(CONF_H, _preds_from(correct, LABELS_H), LABELS_H, GRID_H, method="tolerance", tolerance=0.0)
    assert fit.accuracy == 1.0 and fit.expected_flops == 101  # everyone answers at the cheapest point


def test_tradeoff_curve_rows():
    """The curve lacks a fixed row per (block, size) with its FLOPs and accuracy, or its cascade rows
    are not the 1D family's Pareto front along the chain, costed in FLOPs."""
    rows = C.tradeoff_curve(CONF_H, PREDS_H, LABELS_H, CONF_H, PREDS_H, LABELS_H, GRID_H)
    fixed = [r for r in rows if r["kind"] == "fixed"]
    assert [(r["block"], r["size"], r["flops"], r["accuracy"]) for r in fixed] == [
        (2, 8, 101, 0.5), (2, 16, 102, 0.5), (4, 8, 201, 0.75), (4, 16, 202, 1.0)]
    assert [r["flops_fraction"] for r in fixed][-1] == 1.0
    chain = [(2, 8), (4, 8), (4, 16)]
    conf, preds = C.chain_confidences(CONF_H, PREDS_H, GRID_H, chain)
    one_d = [r for r in A.tradeoff_curve(conf, preds, LABELS_H, conf, preds, LABELS_H, [101, 202, 204]) if r["kind"] == "cascade"]
    casc = [r for r in rows if r["kind"] == "cascade"]
    assert [(r["flops"], r["accuracy"]) for r in casc] == [(r["expected_dims"], r["accuracy"]) for r in one_d]
    assert casc[0]["flops"] == 101 and casc[-1]["accuracy"] == 1.0


# ============================================================================= fitting on structured data
def _structured(seed: int = 0, n: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, C.CostGrid]:
    """Grid of blocks (3, 6, 12) x sizes (8, 64): deeper and wider points are right more often, and a
    right answer is more confident (so a cascade can save FLOPs)."""
    gen = torch.Generator().manual_seed(seed)
    grid = C.CostGrid(layers=(3, 6, 12), dims=(8, 64), block_flops=(3e6, 6e6, 12e6), head_flops=(160, 1280))
    p = torch.tensor([[0.4, 0.45], [0.6, 0.65], [0.85, 0.9]])
    correct = torch.rand(3, 2, n, generator=gen) < p[:, :, None]
    conf = torch.where(correct, 0.5 + 0.5 * torch.rand(3, 2, n, generator=gen), 0.2 + 0.5 * torch.rand(3, 2, n, generator=gen))
    labels = torch.randint(0, 10, (n,), generator=gen)
    return conf, _preds_from(correct, labels), labels, grid


# A short family of cascades (the default traces 41 trade-offs: slow on a busy 2-core machine)
FAMILY = {"lambdas": [0.0, 1e-3, 1e-2, 0.1, 1.0], "points": 32}


@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_tolerance_cascade_meets_its_tolerance_on_calibration(tolerance):
    """The tolerance fit loses more than ``tolerance`` of the chain's best accuracy on its own data,
    saves no FLOPs, or is not the cheapest of the 1D family along the chain within the tolerance."""
    conf, preds, labels, grid = _structured()
    fit = C.fit_cascade(conf, preds, labels, grid, method="tolerance", tolerance=tolerance, **FAMILY)
    assert fit.chain == C.pareto_chain(conf, preds, labels, grid) and len(fit.chain) >= 3
    best = float(C.point_accuracy(preds, labels).max())
    k, g = grid.index(fit.chain[-1])
    assert float(C.point_accuracy(preds, labels)[k, g]) == best  # the chain ends at the most accurate point
    assert fit.accuracy >= best - tolerance - 1e-12
    assert fit.expected_flops < fit.exit_flops[-1] and 0 < fit.flops_fraction < 1
    again = C.evaluate_cascade(conf, preds, labels, grid, fit.chain, fit.thresholds)
    assert again == fit
    c, p = C.chain_confidences(conf, preds, grid, fit.chain)
    thr = A.fit_tolerance(c, p, labels, grid.exit_flops(fit.chain), tolerance, **FAMILY)
    assert fit.thresholds == thr.tolist()


def test_budget_cascade_stays_within_budget_on_calibration():
    """The budget fit spends more than ``budget`` of the full model's FLOPs on its own data, or a
    larger budget buys less accuracy."""
    conf, preds, labels, grid = _structured()
    budgets = (0.3, 0.5, 0.7)
    fits = [C.fit_cascade(conf, preds, labels, grid, method="budget", budget=b, **FAMILY) for b in budgets]
    for budget, fit in zip(budgets, fits):
        assert fit.flops_fraction <= budget + 1e-9
        assert fit.expected_flops <= budget * grid.full_flops + 1e-6
    assert fits[0].accuracy <= fits[1].accuracy <= fits[2].accuracy
    assert fits[0].accuracy < fits[2].accuracy


def test_pairwise_and_custom_chain():
    """pairwise is not the reference's per-pair search along the chain, or a given chain is not used as given."""
    conf, preds, labels, grid = _structured()
    chain = [(3, 8), (6, 64), (12, 64)]
    fit = C.fit_cascade(conf, preds, labels, grid, method="pairwise", chain=chain)
    assert fit.chain == chain and fit.exit_flops == [3e6 + 160, 6e6 + 1440, 12e6 + 2720]
    c, p = C.chain_confidences(conf, preds, grid, chain)
    assert fit.thresholds == A.fit_pairwise(c, p, labels, fit.exit_flops).tolist()


# ============================================================================= errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "fastest"}, "unknown method 'fastest'"),
        ({"method": "budget"}, "needs budget"),
        ({"method": "budget", "budget": 1.5}, r"budget .* \(0, 1\]; got 1.5"),
        ({"method": "budget", "budget": 0}, r"got 0\b"),
        ({"method": "budget", "budget": 0.01}, r"budget 0.01 .* below the cheapest exit .*L3/8"),
        ({"tolerance": -0.1}, "tolerance must be finite and >= 0, got -0.1"),
        ({"chain": [(3, 8)]}, r"at least 2 chain points, got 1"),
        ({"chain": [(3, 8), (5, 32)]}, r"block 5 of point \(5, 32\) is not one of the evaluated blocks \[3, 6, 12\]"),
        ({"chain": [(3, 8), (6, 48)]}, r"size 48 of point \(6, 48\) is not one of the model's sizes"),
        ({"chain": [(3, 8), (3, 8)]}, r"point \(3, 8\) appears twice"),
        ({"chain": [(3, 8), 6]}, r"a chain point is \(block, size\), got 6"),
    ],
)
def test_fit_rejects_bad_arguments_by_name(kwargs, match):
    """A bad method, budget, tolerance or chain is accepted, or its error does not name the value."""
    conf, preds, labels, grid = _structured(n=50)
    with pytest.raises(ValueError, match=match):
        C.fit_cascade(conf, preds, labels, grid, **kwargs)


def test_shape_mismatches_are_named():
    """Tensors that do not fit the grid (or each other) pass, or the error does not give the shapes."""
    conf, preds, labels, grid = _structured(n=50)
    with pytest.raises(ValueError, match=r"conf is \[K=2, G=2, N\] but the grid has 3 blocks"):
        C.fit_cascade(conf[:2], preds[:2], labels, grid)
    with pytest.raises(ValueError, match=r"\(3, 2, 50\) and \(3, 2, 49\)"):
        C.pareto_chain(conf, preds[..., :49], labels, grid)
    with pytest.raises(ValueError, match=r"labels must be \[N=50\], got \(49,\)"):
        C.evaluate_cascade(conf, preds, labels[:49], grid, [(3, 8), (12, 64)], [0.5])
    with pytest.raises(ValueError, match="one threshold per size but the last"):
        C.evaluate_cascade(conf, preds, labels, grid, [(3, 8), (12, 64)], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"layer logits \[K, G, N, C\], got shape \(3, 4, 5\)"):
        C.grid_confidences(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"block_flops must hold one value per entry of layers \(2\), got 1"):
        C.CostGrid(layers=(2, 4), dims=(8,), block_flops=(1,), head_flops=(1,))
    with pytest.raises(ValueError, match=r"layers must be increasing positive integers, got \[4, 2\]"):
        C.CostGrid(layers=(4, 2), dims=(8,), block_flops=(1, 2), head_flops=(1,))
    with pytest.raises(ValueError, match="head_flops must be finite and >= 0, got nan"):
        C.CostGrid(layers=(2,), dims=(8,), block_flops=(1,), head_flops=(math.nan,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "cheapest"}, "unknown method 'cheapest'"),
        ({"method": "budget", "budget": 2.0}, "got 2.0"),
        ({"calibration_fraction": 1.0}, r"calibration_fraction must be in \(0, 1\), got 1.0"),
        ({"chain": [[3, 8]]}, r"at least 2 \[block, size\] points, got \[\[3, 8\]\]"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    """DepthWidthCascade takes a bad argument, failing only after a validation epoch."""
    with pytest.raises(ValueError, match=match):
        DepthWidthCascade(**kwargs)


# ============================================================================= the callback, end to end
def _task() -> MatryoshkaClassifier:
    return MatryoshkaClassifier(num_classes=10, backbone="test_vit", input_size=32, backbone_kwargs={"img_size": 32},
                                matryoshka_2d={}, eval_layers=[2, 4], optimizer="adamw", lr=1e-3)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """A short real fit of a 2D test_vit on the quickstart digits (2 train, 2 val batches of 32) with
    the callback (budget 0.8 of the full model's FLOPs) and a last.ckpt."""
    work = tmp_path_factory.mktemp("cascade2d_fit")
    L.seed_everything(0)
    dm = QuickstartDataModule(batch_size=32)
    task = _task()
    cb = DepthWidthCascade(method="budget", budget=0.8)
    ckpt_cb = ModelCheckpoint(save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                        logger=CSVLogger(str(work), name="c2d"), callbacks=[ckpt_cb, cb], default_root_dir=str(work),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    return SimpleNamespace(trainer=trainer, task=task, cb=cb, dm=dm, ckpt=Path(ckpt_cb.last_model_path).resolve(),
                           log_dir=Path(trainer.log_dir), metrics={k: float(v) for k, v in trainer.callback_metrics.items()})


def _grid_outputs(task: MatryoshkaClassifier, loader, batches: int):
    """conf, preds [K, G, N] and labels [N] of the first ``batches`` batches, computed here."""
    task.eval()
    confs, preds, labels = [], [], []
    with torch.no_grad():
        for (x, y), _ in zip(loader, range(batches)):
            c, p = C.grid_confidences(task.model.layer_outputs(x, task.eval_layers)[0])
            confs.append(c), preds.append(p), labels.append(y)
    return torch.cat(confs, 2), torch.cat(preds, 2), torch.cat(labels)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_callback_fits_on_calibration_and_logs(fitted):
    """The callback's adaptive2d/* metrics or its fitted chain and thresholds are missing, or are not
    the library's fit on the calibration half scored on the rest, with FLOPs of the evaluated size."""
    cb, m, task = fitted.cb, fitted.metrics, fitted.task
    for key in ("adaptive2d/top1", "adaptive2d/expected_gflops", "adaptive2d/flops_fraction"):
        assert key in m, sorted(m)
    assert task.eval_layers == [2, 4, 6] and cb.fitted["layers"] == [2, 4, 6] and cb.fitted["dims"] == [8, 16, 32, 64]
    conf, preds, labels = _grid_outputs(task, fitted.dm.val_dataloader(), 2)
    assert labels.numel() == 64
    grid = C.CostGrid.from_model(task.model, [2, 4, 6])
    cal, rest = A.calibration_split(64, 0.5, seed=0)
    refit = C.fit_cascade(conf[:, :, cal], preds[:, :, cal], labels[cal], grid, method="budget", budget=0.8)
    assert cb.fitted["chain"] == [list(p) for p in refit.chain]
    assert cb.fitted["thresholds"] == pytest.approx(refit.thresholds, abs=1e-6)
    res = C.evaluate_cascade(conf[:, :, rest], preds[:, :, rest], labels[rest], grid, refit.chain, refit.thresholds)
    assert m["adaptive2d/top1"] == pytest.approx(res.accuracy, abs=1e-6)
    assert m["adaptive2d/expected_gflops"] == pytest.approx(res.expected_flops / 1e9, rel=1e-6)
    assert m["adaptive2d/flops_fraction"] == pytest.approx(res.flops_fraction, rel=1e-6)
    assert refit.flops_fraction <= 0.8 + 1e-9  # the budget holds where it was fitted


def test_callback_writes_the_curve(fitted):
    """adaptive2d_val_curve.csv/.png are missing, or lack a fixed row per (block, size) or the chosen cascade."""
    csv_path, png_path = fitted.log_dir / "adaptive2d_val_curve.csv", fitted.log_dir / "adaptive2d_val_curve.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert csv_path.read_text().splitlines()[0] == "kind,block,size,gflops,flops_fraction,top1,chain,thresholds"
    rows = _read_csv(csv_path)
    fixed = [(int(r["block"]), int(r["size"])) for r in rows if r["kind"] == "fixed"]
    assert sorted(fixed) == [(k, m) for k in (2, 4, 6) for m in (8, 16, 32, 64)]
    assert [r for r in rows if r["kind"] == "cascade"]
    (chosen,) = [r for r in rows if r["kind"] == "chosen"]
    assert chosen["chain"] == " ".join(f"L{k}/{m}" for k, m in fitted.cb.fitted["chain"])
    assert float(chosen["gflops"]) == pytest.approx(fitted.metrics["adaptive2d/expected_gflops"], rel=1e-6)
    full = [r for r in rows if r["kind"] == "fixed" and (r["block"], r["size"]) == ("6", "64")]
    assert float(full[0]["flops_fraction"]) == 1.0
    assert not list(fitted.log_dir.glob(".*.tmp"))  # written through temporary names, all renamed


def test_test_reuses_the_validation_fit_from_the_checkpoint(fitted, tmp_path):
    """trainer.test does not restore the chain and thresholds fitted on validation from the checkpoint
    and score them on the whole test set."""
    state = torch.load(fitted.ckpt, map_location="cpu", weights_only=False)["callbacks"]["DepthWidthCascade"]
    assert state["fitted"] == fitted.cb.fitted and state["method"] == "budget"
    task, cb = _task(), DepthWidthCascade(method="budget", budget=0.8)
    trainer = L.Trainer(accelerator="cpu", devices=1, limit_test_batches=2, logger=CSVLogger(str(tmp_path), name="t"),
                        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, datamodule=fitted.dm, ckpt_path=str(fitted.ckpt), verbose=False)
    assert cb.fitted == fitted.cb.fitted
    conf, preds, labels = _grid_outputs(task, fitted.dm.test_dataloader(), 2)
    grid = C.CostGrid.from_model(task.model, [2, 4, 6])
    res = C.evaluate_cascade(conf, preds, labels, grid, cb.fitted["chain"], cb.fitted["thresholds"])  # all 64
    assert cb.result["chain"] == cb.fitted["chain"] and cb.result["accuracy"] == pytest.approx(res.accuracy, abs=1e-9)
    assert cb.result["exit_fractions"] == pytest.approx(res.exit_fractions, abs=1e-9)
    assert float(trainer.callback_metrics["adaptive2d/top1"]) == pytest.approx(res.accuracy, abs=1e-6)
    assert (Path(trainer.log_dir) / "adaptive2d_test_curve.csv").is_file()


def test_callback_ignores_a_model_without_eval_layers(tmp_path):
    """DepthWidthCascade fails or writes files for a 1D model (no layer_logits)."""
    L.seed_everything(0)
    task = MatryoshkaClassifier(num_classes=10, backbone="test_vit", input_size=32, backbone_kwargs={"img_size": 32})
    cb = DepthWidthCascade()
    trainer = L.Trainer(accelerator="cpu", devices=1, limit_val_batches=1, logger=CSVLogger(str(tmp_path), name="v"),
                        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(task, datamodule=QuickstartDataModule(batch_size=16), verbose=False)
    assert cb.fitted is None and cb.result is None
    assert not any(k.startswith("adaptive2d/") for k in trainer.callback_metrics)
    assert not list(Path(trainer.log_dir).glob("adaptive2d_*"))


def test_every_n_epochs_is_validated():
    from mrl_vision.callbacks import DepthWidthCascade

    with pytest.raises(ValueError, match=r"every_n_epochs must be an integer >= 1, got 0"):
        DepthWidthCascade(every_n_epochs=0)


def test_confidence_margin_costs_at_least_as_much_and_is_validated():
    """With a confidence bound the tolerance fit is cheaper than without (it must be safer), or a bad
    confidence is not refused by name."""
    conf, preds, labels, grid = _structured(seed=3)
    plain = C.fit_cascade(conf, preds, labels, grid, tolerance=0.02, **FAMILY)
    safe = C.fit_cascade(conf, preds, labels, grid, tolerance=0.02, confidence=0.95, **FAMILY)
    assert safe.expected_flops >= plain.expected_flops and safe.chain == plain.chain
    with pytest.raises(ValueError, match=r"confidence must be a number in \(0, 1\).*got confidence=1.5"):
        DepthWidthCascade(confidence=1.5)
    with pytest.raises(ValueError, match=r"confidence applies to method='tolerance' only, got method='budget'"):
        DepthWidthCascade(method="budget", budget=0.5, confidence=0.9)
