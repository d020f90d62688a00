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
    out = quickstart_run.work / "cascade.json"
    rows = mod.main([str(quickstart_run.run), "--tolerance", "0.005", "--json", str(out)])
    assert json.loads(out.read_text()) == rows and len(rows) == 2
    model, dm = load_run(quickstart_run.run)
    with torch.no_grad():
        test = mod.split_outputs(model, dm, "test")
        val = mod.split_outputs(model, dm, "val")
    for r in rows:
        res = A.evaluate_cascade(*test, model.dims, torch.tensor(r["thresholds"]))
        assert math.isclose(res.accuracy, r["test_top1"]) and math.isclose(res.expected_dims, r["test_dims"])
        refit = A.fit_tolerance(*val, model.dims, tolerance=r["tolerance"], confidence=r["confidence"])
        assert refit.tolist() == r["thresholds"]  # fitted on validation only
        assert r["holds"] == (r["test_largest"] - r["test_top1"] <= r["tolerance"] + 1e-12)
    printed = capsys.readouterr().out
    assert printed.count("| 0.5 |") == 2 and "95% lower bound" in printed
