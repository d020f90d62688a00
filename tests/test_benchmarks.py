"""The benchmark scripts run end to end: ``benchmarks/gpu_throughput.py --smoke`` on the CPU, in a
subprocess, with its real data path (photographs -> .beton -> FFCVDataModule -> Lightning)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_throughput.py"


@pytest.mark.slow  # about 30 s on 2 cores (FFCV's JIT compilation, 12 short Trainer runs)
def test_gpu_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "== Training throughput, test_resnet" in proc.stdout, log[-4000:]
    assert "targets at 176 px" in proc.stdout
    assert list((tmp_path / "work").iterdir()) == [], "the temporary data folder was not removed"

    result = json.loads(out.read_text())
    with_ffcv = importlib.util.find_spec("ffcv") is not None
    assert (result["ffcv_skipped"] is None) == with_ffcv, result["ffcv_skipped"]
    rows = {(r["size"], r["head"]): r for r in result["rows"]}
    assert set(rows) == {(s, h) for s in (32, 48) for h in ("plain", "mrl", "mrl_e")}
    keys = ["model_only_img_s", "model_only_ratio"] + (["ffcv_img_s", "ffcv_ratio", "ffcv_over_model_only"] if with_ffcv else [])
    for (size, head), row in rows.items():
        for key in keys:
            value = row[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (size, head, key, value)
        if head == "plain":
            assert row["model_only_ratio"] == 1.0
            assert not with_ffcv or row["ffcv_ratio"] == 1.0
        if not with_ffcv:
            assert row["ffcv_img_s"] is None
    # every row also printed in the table, with its size and head
    table = proc.stdout.split("== Training throughput")[1]
    for size, head in rows:
        assert any(line.split()[:2] == [str(size), head] for line in table.splitlines()), (size, head)


def test_matryoshka_2d_results_table(tmp_path: Path, capsys) -> None:
    """The 2D results table miscomputes a mean or spread over seeds, or drops the probes or the cascade."""
    spec = importlib.util.spec_from_file_location("m2d_results", REPO_ROOT / "benchmarks" / "matryoshka_2d_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for kind, values in (("mrl2d", (90.0, 92.0, 94.0)), ("mrl1d", (91.0, 91.0, 94.0))):
        for seed, v in enumerate(values):
            run = tmp_path / f"{kind}-s{seed}-test"
            run.mkdir()
            (run / "test_grid.csv").write_text(f"layers,dims,top1\n6,8,{v - 10}\n6,16,{v - 5}\n12,8,{v - 1}\n12,16,{v}\n")
            (run / "metrics.csv").write_text("step,adaptive2d/top1,adaptive2d/expected_gflops,adaptive2d/flops_fraction\n"
                                             f"0,{v / 100},0.05,0.25\n")
    cut = tmp_path / "standard-L6"
    cut.mkdir()
    (cut / "truncation.csv").write_text("dims,prefix_top1,svd_top1\n8,50.0,70.0\n16,60.0,75.0\n")
    text = mod.main([str(tmp_path), "--out", str(tmp_path / "table.md")])
    assert "| 12 | 91.0 ± 2.0 | 92.0 ± 2.0 |" in text  # the 2D model: mean ± sample sd of 3 seeds
    assert "| 12 | 91.0 ± 1.7 | 92.0 ± 1.7 |" in text  # 1D: 91, 91, 94
    assert "| 6 | 50.0 / 70.0 | 60.0 / 75.0 |" in text
    assert "difference of the means +0.00 points" in text and "| mrl2d-s1 | 92.0 | 0.0500 | 0.25 |" in text
    assert (tmp_path / "table.md").read_text() == text
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "missing")])


def test_cascade_eval_fits_on_validation_and_reports_test(quickstart_run, capsys) -> None:
    """The val-vs-test cascade table does not refit per split, or misstates the drop on test or whether the
    tolerance held there (checked against evaluate_cascade with the printed thresholds)."""
    import torch

    from mrl_vision import adaptive as A
    from mrl_vision.runs import load_run

    spec = importlib.util.spec_from_file_location("cascade_eval", REPO_ROOT / "benchmarks" / "cascade_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen = {}
    real = mod.split_outputs

    def recording(model, dm, split):  # the outputs main() fits and scores on, kept for the checks below
        seen[split] = real(model, dm, split)
        return seen[split]

    mod.split_outputs = recording
    out = quickstart_run.work / "cascade.json"
    rows = mod.main([str(quickstart_run.run), "--tolerance", "0.005", "--json", str(out)])
    assert json.loads(out.read_text()) == rows and len(rows) == 2
    model, dm = load_run(quickstart_run.run)
    val, test = seen["val"], seen["test"]
    with torch.no_grad():  # the recorded outputs are the model's on those splits
        x, y = next(iter(dm.eval_dataloader("test", batch_size=8)))
        conf, preds = A.confidences(model.eval_logits(x))
    assert torch.equal(preds, test[1][:, :8]) and torch.equal(y, test[2][:8])
    for r in rows:
        res = A.evaluate_cascade(*test, model.dims, torch.tensor(r["thresholds"]))
        assert math.isclose(res.accuracy, r["test_top1"]) and math.isclose(res.expected_dims, r["test_dims"])
        refit = A.fit_tolerance(*val, model.dims, tolerance=r["tolerance"], confidence=r["confidence"])
        assert refit.tolist() == r["thresholds"]  # fitted on validation only
        assert r["holds"] == (r["test_largest"] - r["test_top1"] <= r["tolerance"] + 1e-12)
    printed = capsys.readouterr().out
    assert printed.count("| 0.5 |") == 2 and "95% lower bound" in printed


def test_tiny_compare_table_reads_every_column(tmp_path: Path) -> None:
    """The Tiny-ImageNet table puts a figure in the wrong column or size, or drops FF runs or the standard model
    (FF at the full width), or fails on a missing run instead of leaving its column empty."""
    spec = importlib.util.spec_from_file_location("tiny_table", REPO_ROOT / "benchmarks" / "tiny_compare_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def write(rel: str, header: str, rows: list[str]) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([header, *rows]) + "\n")

    write("mrl-test/test_accuracy.csv", "dims,top1,top5", ["8,16.2,40", "512,24.7,52"])
    write("ff8-test/test_accuracy.csv", "dims,top1,top5", ["8,17.9,41"])
    write("standard-test/test_accuracy.csv", "dims,top1,top5", ["512,26.6,53"])
    write("standard-probes/truncation.csv", "dims,prefix_top1,svd_top1,prefix_wd,svd_wd", ["8,7.0,19.9,0,0.001",
                                                                                          "512,27.6,26.3,0.01,0.01"])
    write("mrl-retrieval/retrieval.csv", "dim,nn1_top1,knn_top1,map_at_10_ref,map_at_10", ["8,8.3,12.9,4.0,3.99"])
    dims, cols = mod.collect(tmp_path)
    assert dims == [8, 512]
    assert cols["MRL"] == {8: 16.2, 512: 24.7} and cols["MRL-E"] == {}
    assert cols["FF-m"] == {8: 17.9, 512: 26.6}
    assert cols["standard, first m + probe"] == {8: 7.0, 512: 27.6} and cols["standard, SVD m + probe"][8] == 19.9
    assert cols["MRL 1-NN"] == {8: 8.3} and cols["MRL mAP@10"] == {8: 3.99} and cols["standard 1-NN"] == {}
    lines = mod.table(tmp_path).splitlines()
    assert lines[2].startswith("| 8 | 16.20 |  | 17.90 | 7.00 | 19.90 |")


def test_embedding_loss_overhead_quick(capsys) -> None:
    """benchmarks/embedding_loss_overhead.py --quick: every variant timed, ratios to the base loss printed."""
    spec = importlib.util.spec_from_file_location("embedding_loss_overhead",
                                                  REPO_ROOT / "benchmarks" / "embedding_loss_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ratios = module.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert set(ratios) == {"base", "matryoshka (5 sizes)", "matryoshka (2 sizes per step)"}
    assert ratios["base"] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios.values())
    assert "the loss alone" in out and "x base" in out
