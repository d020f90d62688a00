"""Analysis: FF in one override, post-hoc truncation, `mrl-vision report`, the notebooks.

Unit tests of the probes and the per-sample helpers on hand-made tensors, then one short real
quickstart session (ResNet test model, 1 epoch on a few batches: MRL, the standard model as
``--model.head ff --model.dims '[96]'``, each tested; ``mrl-vision truncate`` of the standard model) that the report
command and both notebooks run against. The notebooks execute headless through nbclient.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from conftest import QUICKSTART_CONFIG, REPO_ROOT, TEST_RESNET_DIMS, TEST_RESNET_WIDTH
from mrl_vision import MatryoshkaClassifier, analysis
from mrl_vision.cli import cli, main
from mrl_vision.heads import FixedFeatureHead, MatryoshkaHead
from mrl_vision.model import upgrade_config
from mrl_vision.report import read_run_results
from mrl_vision.truncation import fit_linear_probe, probe_accuracy, svd_basis, truncate_model, truncation_table

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- FF in one override
def test_ff_is_one_override(run_dir):
    """`--model.head ff --model.dims '[m]'` does not turn an MRL config into the FF baseline at that
    size, a bad FF size is accepted, or an old checkpoint's `ff_dim` is not read as that baseline."""
    base = ["--config", str(QUICKSTART_CONFIG), "--model.backbone", "test_resnet", "--trainer.accelerator", "cpu"]
    mrl = cli(base, run=False).model.model
    assert mrl.head_kind == "mrl" and isinstance(mrl.head, MatryoshkaHead) and mrl.dims == TEST_RESNET_DIMS
    c = cli([*base, "--model.head", "ff", "--model.dims", "[16]"], run=False)
    ff = c.model.model
    assert c.model.hparams.head == "ff" and c.model.hparams.dims == [16]
    assert ff.head_kind == "ff" and ff.dims == [16] and ff.width == TEST_RESNET_WIDTH
    assert isinstance(ff.head, FixedFeatureHead) and ff.head.dim == 16 and ff.head.projection is None
    assert ff(torch.randn(2, 3, 32, 32)).shape == (1, 2, 10)
    proj = MatryoshkaClassifier(num_classes=10, backbone="test_resnet", head="ff_projection", dims=[8]).model
    assert proj.head_kind == "ff_projection" and proj.dims == [8] and proj.head.projection is not None
    for bad in ([0], [TEST_RESNET_WIDTH + 1], [2.5], [True], [8, 16]):
        with pytest.raises(ValueError, match="dims"):
            MatryoshkaClassifier(num_classes=10, backbone="test_resnet", head="ff", dims=bad)
    # hyperparameters of a checkpoint written before the rename: nesting and ff_dim
    old = {"num_classes": 10, "backbone": "test_resnet", "head": "mrl", "nesting": [8, 16, 96], "ff_dim": 16}
    new = upgrade_config(old)
    assert new["head"] == "ff" and new["dims"] == [16] and "ff_dim" not in new and "nesting" not in new
    assert old["ff_dim"] == 16 and old["nesting"] == [8, 16, 96]  # the caller's dict is left alone
    assert MatryoshkaClassifier(**new).model.dims == [16]
    kept = upgrade_config({"head": "ff_projection", "ff_dim": 8})
    assert kept["head"] == "ff_projection" and kept["dims"] == [8]
    assert upgrade_config({"head": "mrl", "nesting": [8, 16]}) == {"head": "mrl", "dims": [8, 16]}


# ----------------------------------------------------------------------------- probes
def test_linear_probe_separates_separable_data():
    """The L-BFGS probe does not fit linearly separable classes (or mislabels them)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 4
    y = torch.arange(400) % 4
    x = centres[y] + 0.3 * torch.randn(400, 6, generator=g)
    assert probe_accuracy(x[:300], y[:300], x[300:], y[300:], 4) == 1.0
    w, b = fit_linear_probe(x, y, 4)
    assert w.shape == (4, 6) and b.shape == (4,)
    with pytest.raises(ValueError, match="labels must be in"):
        fit_linear_probe(x, y + 1, 4)


def test_svd_basis_orders_directions_by_variance():
    """The SVD basis is not orthonormal or does not put the high-variance direction first."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 5, generator=g) * torch.tensor([0.1, 0.2, 5.0, 0.3, 1.0])
    mean, basis = svd_basis(x)
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-4)
    assert basis[:, 0].abs().argmax() == 2 and basis[:, 1].abs().argmax() == 4


def test_truncation_table_prefix_vs_svd():
    """The prefix probe does not suffer when the signal sits in the last coordinates (and SVD does not recover it)."""
    g = torch.Generator().manual_seed(2)
    y = torch.arange(600) % 3
    signal = torch.nn.functional.one_hot(y, 3).float() * 6
    z = torch.cat([0.1 * torch.randn(600, 13, generator=g), signal + 0.5 * torch.randn(600, 3, generator=g)], 1)
    rows = truncation_table(z[:450], y[:450], z[450:], y[450:], [2, 16], 3)
    assert [r["dims"] for r in rows] == [2, 16]
    assert rows[0]["prefix_top1"] < 60 and rows[0]["svd_top1"] > 95  # 2 noise coordinates vs the 2 top directions
    assert rows[1]["prefix_top1"] > 95 and rows[1]["svd_top1"] > 95
    with pytest.raises(ValueError, match="sizes must be integers"):
        truncation_table(z[:450], y[:450], z[450:], y[450:], [0, 17], 3)



def _clusters(n: int, seed: int, d: int = 12, c: int = 4, noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian clusters (fixed centres, seeded noise): with few training samples a probe
    over-fits them, so the weight decay matters."""
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % c
    return centres[y] + noise * torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), y


def _views(z_train: torch.Tensor, m: int) -> dict:
    mean, basis = svd_basis(z_train)
    return {"prefix": lambda z: z[:, :m], "svd": lambda z: (z - mean) @ basis[:, :m]}


WDS = [0.0, 0.1, 1.0, 10.0]


def test_weight_decay_chosen_on_the_selection_set():
    """Several weight decays: a probe's is not the one most accurate on the selection set (first among
    equals), or its reported accuracy is not the test accuracy of that probe."""
    (ztr, ytr), (zse, yse), (zte, yte) = _clusters(40, 1), _clusters(200, 2), _clusters(200, 3)
    rows = truncation_table(ztr, ytr, zte, yte, [2, 12], 4, WDS, z_select=zse, y_select=yse)
    assert [list(r) for r in rows] == [["dims", "prefix_top1", "svd_top1", "prefix_wd", "svd_wd"]] * 2
    chosen = set()
    for row in rows:
        for kind, view in _views(ztr, row["dims"]).items():
            on_select = [probe_accuracy(view(ztr), ytr, view(zse), yse, 4, wd) for wd in WDS]
            best = WDS[on_select.index(max(on_select))]
            assert row[f"{kind}_wd"] == best, (row["dims"], kind, on_select)
            assert row[f"{kind}_top1"] == pytest.approx(100 * probe_accuracy(view(ztr), ytr, view(zte), yte, 4, best))
            chosen.add(best)
    assert len(chosen) > 1  # the data make the choice matter: not the same value everywhere


def test_single_weight_decay_reproduces_the_plain_table():
    """One weight decay (a number or a one-value list, selection set or not) changes the columns or numbers."""
    (ztr, ytr), (zse, yse), (zte, yte) = _clusters(40, 1), _clusters(200, 2), _clusters(200, 3)
    plain = truncation_table(ztr, ytr, zte, yte, [2, 12], 4, 1e-3)
    assert plain == truncation_table(ztr, ytr, zte, yte, [2, 12], 4, [1e-3], z_select=zse, y_select=yse)
    for row in plain:
        assert list(row) == ["dims", "prefix_top1", "svd_top1"]
        for kind, view in _views(ztr, row["dims"]).items():
            assert row[f"{kind}_top1"] == 100.0 * probe_accuracy(view(ztr), ytr, view(zte), yte, 4, 1e-3)


@pytest.mark.parametrize("efficient", [False, True], ids=["mrl", "mrl_e"])
def test_head_column_is_the_heads_own_accuracy(efficient, tmp_path):
    """head_top1 is not the head's own classifier at that size (by hand), or is filled at a size it lacks."""
    (ztr, ytr), (zte, yte) = _clusters(40, 1), _clusters(200, 3)
    torch.manual_seed(0)
    head = MatryoshkaHead(12, 4, [4, 8, 12], efficient=efficient)
    rows = truncation_table(ztr, ytr, zte, yte, [2, 4, 12], 4, 1e-3, head=head)
    assert [r["dims"] for r in rows] == [2, 4, 12] and rows[0]["head_top1"] is None
    for row, g in ((rows[1], 0), (rows[2], 2)):
        m = row["dims"]
        w, b = (head.linear.weight[:, :m], head.linear.bias) if efficient else (head.linears[g].weight, head.linears[g].bias)
        by_hand = (zte[:, :m] @ w.detach().T + b.detach()).argmax(-1).eq(yte).double().mean()
        assert row["head_top1"] == pytest.approx(100 * float(by_hand), abs=1e-4)
    from mrl_vision.truncation import write_truncation

    written = _read_csv(write_truncation(tmp_path, rows, {"head": "mrl"}))
    assert written[0]["head_top1"] == "" and float(written[1]["head_top1"]) == pytest.approx(rows[1]["head_top1"])
    series = read_run_results(tmp_path)["series"]  # `mrl-vision report` still reads the probes
    assert [r["dims"] for r in series["MRL, first m dims + linear probe"]] == [2, 4, 12]


def test_bad_weight_decays_and_selection_split_fail_naming_them():
    """An empty or negative weight decay, several without a selection set, or a selection split equal to
    the evaluation (or fitting) split is accepted."""
    (ztr, ytr), (zte, yte) = _clusters(40, 1), _clusters(200, 3)
    with pytest.raises(ValueError, match="weight_decay is an empty list"):
        truncation_table(ztr, ytr, zte, yte, [2], 4, [])
    for bad in (-0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"weight decays must be finite numbers >= 0, got {bad!r}"):
            truncation_table(ztr, ytr, zte, yte, [2], 4, [1e-4, bad])
    with pytest.raises(ValueError, match=r"2 weight decays \[0.0001, 0.01\] need a selection set"):
        truncation_table(ztr, ytr, zte, yte, [2], 4, [1e-4, 1e-2])
    from mrl_vision.data import QuickstartDataModule
    from mrl_vision.model import MatryoshkaModel

    model, dm = MatryoshkaModel(num_classes=10, backbone="test_resnet"), QuickstartDataModule()
    with pytest.raises(ValueError, match="select_split='test' is the evaluation split"):
        truncate_model(model, dm, weight_decay=[1e-4, 1e-2], select_split="test")
    with pytest.raises(ValueError, match="select_split='train' is the split the probes are fitted on"):
        truncate_model(model, dm, weight_decay=[1e-4, 1e-2], select_split="train")
    with pytest.raises(ValueError, match="got -1.0"):
        truncate_model(model, dm, weight_decay=[-1.0])


def test_truncate_command_selects_and_reports_heads(tmp_path, monkeypatch, capsys):
    """`mrl-vision truncate --weight-decay A B --select-split val` on an MRL model does not write the chosen
    weight decays and the model's own heads beside the probes, or accepts selecting on the evaluation split."""
    from mrl_vision import runs
    from mrl_vision.data import QuickstartDataModule
    from mrl_vision.model import MatryoshkaModel

    torch.manual_seed(0)
    model, dm = MatryoshkaModel(num_classes=10, backbone="test_resnet").eval(), QuickstartDataModule(batch_size=64)
    read = dm.eval_dataloader
    seen = []

    def few(split, **kw):  # 63 images of each split keep this quick
        seen.append(split)
        return read(split, subset=range(0, 500, 8))

    monkeypatch.setattr(dm, "eval_dataloader", few)
    monkeypatch.setattr(runs, "load_run", lambda path, rest: (model, dm))
    out = tmp_path / "t"
    main(["truncate", "--ckpt_path", "m", "--out", str(out), "--sizes", "8", "12", "96", "--weight-decay", "1e-4", "1e-2",
          "--device", "cpu"])
    assert seen == ["train", "test", "val"]
    rows = _read_csv(out / "truncation.csv")
    assert list(rows[0]) == ["dims", "prefix_top1", "svd_top1", "head_top1", "prefix_wd", "svd_wd"]
    assert [r["head_top1"] != "" for r in rows] == [True, False, True]  # the head has 8 and 96, not 12
    assert all(float(r["prefix_wd"]) in (1e-4, 1e-2) and float(r["svd_wd"]) in (1e-4, 1e-2) for r in rows)
    meta = json.loads((out / "truncation.json").read_text())
    assert meta["weight_decay"] == [1e-4, 1e-2] and meta["select_split"] == "val" and meta["num_select"] == 63
    printed = capsys.readouterr().out
    assert "weight decay chosen per size on 63 val images" in printed
    assert "| 0.0001 |" in printed or "| 0.01 |" in printed  # weight decays printed as numbers, not 0.00
    with pytest.raises(SystemExit, match="select_split='test' is the evaluation split"):
        main(["truncate", "--ckpt_path", "m", "--out", str(out), "--weight-decay", "1e-4", "1e-2", "--select-split", "test"])
    with pytest.raises(SystemExit, match="weight decays must be finite numbers >= 0, got -0.1"):
        main(["truncate", "--ckpt_path", "m", "--out", str(out), "--weight-decay", "-0.1"])


# ----------------------------------------------------------------------------- per-sample helpers
def test_per_class_and_misclassified_on_hand_made_logits():
    """Per-class accuracy, the most misclassified classes or the exit histogram are wrong on a hand-made case."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    small = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2, 2, 1]), 3).float() * 3  # class 1 always wrong
    large = torch.nn.functional.one_hot(labels, 3).float() * 3
    logits = torch.stack([small, large])
    acc = analysis.per_class_accuracy(logits, labels, [8, 16], 8)
    assert acc.tolist() == [50.0, 0.0, 50.0]
    assert analysis.per_class_accuracy(logits, labels, [8, 16], 16).tolist() == [100.0, 100.0, 100.0]
    worst = analysis.most_misclassified(logits, labels, [8, 16], 8, classes=["a", "b", "c"], k=2)
    assert worst[0] == {"class": "b", "samples": 2, "errors": 2, "error %": 100.0, "taken for": "c"}
    assert len(worst) == 2
    with pytest.raises(ValueError, match="dim=32 is not one of the sizes"):
        analysis.per_class_accuracy(logits, labels, [8, 16], 32)
    # softmax of 3 vs 0 logits: confidence 0.9094 at size 8 for every sample; a threshold of 0.95 sends all on
    sizes, counts = analysis.exit_sizes(logits, [0.5], [8, 16])
    assert counts == {8: 6, 16: 0} and sizes.tolist() == [8] * 6
    assert analysis.exit_sizes(logits, [0.95], [8, 16])[1] == {8: 0, 16: 6}


# ----------------------------------------------------------------------------- a real session
def _fit_and_test(runs: Path, version: str, *extra: str) -> None:
    common = ["--model.backbone", "test_resnet", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(runs.parent), "--trainer.logger.init_args.name", runs.name,
              "--data.init_args.batch_size", "64", *extra]
    cli(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6",
         "--trainer.limit_val_batches", "4", "--trainer.num_sanity_val_steps", "0",
         "--trainer.logger.init_args.version", version])
    cli(["test", *common, "--ckpt_path", str(runs / version / "checkpoints" / "last.ckpt"),
         "--trainer.logger.init_args.version", f"{version}-test"])


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """runs/q/{mrl, mrl-test, ff96, ff96-test, truncated}: a short real quickstart session."""
    work = tmp_path_factory.mktemp("analysis")
    old, argv = os.getcwd(), sys.argv
    os.chdir(work)
    sys.argv = ["mrl-vision"]  # LightningCLI(args=...) must not also see pytest's arguments
    try:
        runs = work / "runs" / "q"
        _fit_and_test(runs, "mrl")
        _fit_and_test(runs, "ff96", "--model.head", "ff", "--model.dims", f"[{TEST_RESNET_WIDTH}]")
        main(["truncate", "--ckpt_path", str(runs / "ff96" / "checkpoints" / "last.ckpt"), "--out", str(runs / "truncated"),
              "--sizes", "8", "16", "96", "--fit-split", "val", "--data.init_args.batch_size", "250"])
    finally:
        os.chdir(old)
        sys.argv = argv
    return runs


@pytest.mark.slow
def test_truncate_command_writes_probe_table(session):
    """`mrl-vision truncate` does not write one row per size with accuracies, or its metadata."""
    rows = _read_csv(session / "truncated" / "truncation.csv")
    assert [int(r["dims"]) for r in rows] == [8, 16, 96]
    assert list(rows[0]) == ["dims", "prefix_top1", "svd_top1"]  # one weight decay, a standard model: as before
    for r in rows:
        assert 0 <= float(r["prefix_top1"]) <= 100 and 0 <= float(r["svd_top1"]) <= 100
    meta = json.loads((session / "truncated" / "truncation.json").read_text())
    assert meta["head"] == "ff" and meta["width"] == TEST_RESNET_WIDTH and meta["num_fit"] == 500 and meta["num_eval"] == 500
    assert meta["weight_decay"] == 1e-4 and "select_split" not in meta
    # the full-width probe matches or beats chance by far on real digits, even after 6 steps
    assert float(rows[-1]["prefix_top1"]) > 30


@pytest.mark.slow
def test_report_command(session, tmp_path, capsys):
    """`mrl-vision report` does not combine the runs into one figure and table with the right curves."""
    out = tmp_path / "report"
    main(["report", str(session / "mrl-test"), str(session / "ff96-test"), str(session / "truncated"),
          str(session / "mrl"), "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ("accuracy_vs_dims.png", "accuracy_vs_dims.csv", "accuracy_vs_dims.md", "adaptive.png", "adaptive.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = _read_csv(out / "accuracy_vs_dims.csv")
    assert [int(r["dims"]) for r in table] == sorted(set(TEST_RESNET_DIMS) | {8, 16, 96})
    cols = set(table[0])
    assert {"FF", "standard, first m dims + linear probe", "standard, SVD to m dims + linear probe"} <= cols
    assert any(c.startswith("MRL (") for c in cols)  # two MRL runs (tested and validated): told apart by folder
    tested = {int(r["dims"]): float(r["top1"]) for r in _read_csv(session / "mrl-test" / "test_accuracy.csv")}
    mrl_col = "MRL (mrl-test)"
    assert {int(r["dims"]): float(r[mrl_col]) for r in table} == pytest.approx(tested)
    ff = {int(r["dims"]): r["FF"] for r in table}
    assert ff[96] != "" and ff[8] == ""  # one FF model, at 96
    assert "| dims |" in printed and "adaptive classification" in printed
    with pytest.raises(SystemExit, match="does not exist"):
        main(["report", str(tmp_path / "missing"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no per-size accuracies"):
        main(["report", str(tmp_path), "--out", str(out)])


def test_committed_notebooks_carry_no_outputs():
    """A committed notebook holds outputs or execution counts (they rot and bloat diffs)."""
    assert [p.name for p in NOTEBOOKS] == ["accuracy_vs_dims.ipynb", "adaptive_classification.ipynb", "retrieval.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_headless(path, session, monkeypatch):
    """A notebook fails against a real session's runs (it has rotted against the library)."""
    from nbclient import NotebookClient

    monkeypatch.setenv("MRL_VISION_RUNS", str(session))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("data", {}).get("text/plain", o.get("text", "")) for o in outputs])
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)  # figures drawn
    if path.stem == "accuracy_vs_dims":
        assert "FF" in text and "top-1 % at 8" in text
    elif path.stem == "retrieval":
        assert "nn1_top1" in text and "adaptive" in text and "funnel" in text and "exact 96-d search" in text
    else:
        assert "cascade:" in text and "taken for" in text
