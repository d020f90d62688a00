"""The 2D cascade of a trained 2D Matryoshka run, fitted on validation and evaluated on test, side by side.

    python benchmarks/cascade2d_eval.py RUN_OR_CKPT [--method tolerance --tolerance 0.005 --confidence 0.95] [--out DIR]

One Lightning Trainer validates (``DepthWidthCascade`` fits the chain and thresholds on a seeded half of the
validation split and evaluates them on the other half) and then tests (the same cascade on the whole test
split), with the run's data (its ``config.yaml``) and the task's ``eval_layers``. Prints the cascade's top-1,
expected GFLOPs and share of the full model's FLOPs on both, beside the full model's top-1; writes
``adaptive2d_{val,test}_curve.{csv,png}`` into ``--out`` (a CSV logger folder).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from mrl_vision import MatryoshkaClassifier
from mrl_vision.callbacks import DepthWidthCascade
from mrl_vision.runs import find_weights, load_run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder or a checkpoint of a task with eval_layers (a 2D Matryoshka run)")
    p.add_argument("--method", default="tolerance", choices=["tolerance", "budget", "pairwise"])
    p.add_argument("--tolerance", type=float, default=0.005, help="accuracy drop allowed (fraction)")
    p.add_argument("--budget", type=float, default=None, help="FLOPs as a fraction of the full model's (budget)")
    p.add_argument("--confidence", type=float, default=None,
                   help="tolerance with a lower confidence bound (e.g. 0.95) instead of on the calibration half alone")
    p.add_argument("--seed", type=int, default=0, help="the calibration split's seed")
    p.add_argument("--out", default="runs/cascade2d", help="where the curves go (a CSV logger folder)")
    a = p.parse_args(argv)
    ckpt = find_weights(a.run)
    task = MatryoshkaClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    if task.eval_layers is None or len(task.eval_layers) < 2:
        raise SystemExit(f"error: {a.run} has no (block, size) grid: train with matryoshka_2d or eval_layers")
    _, dm = load_run(a.run)
    cascade = DepthWidthCascade(method=a.method, tolerance=a.tolerance, budget=a.budget, seed=a.seed,
                                confidence=a.confidence)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(a.out, name="", version=""), callbacks=[cascade],
                        enable_progress_bar=False, enable_model_summary=False)
    results = {}
    full = (str(task.eval_layers[-1]), str(task.model.dims[-1]))
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        run(task, datamodule=dm, verbose=False)
        # the full model on the same images as the cascade: its fixed point in the curve
        with open(Path(trainer.log_dir) / f"adaptive2d_{stage}_curve.csv", newline="") as f:
            row = next(r for r in csv.DictReader(f) if r["kind"] == "fixed" and (r["block"], r["size"]) == full)
        results[stage] = {"full_top1": float(row["top1"]), **cascade.result}
    print(f"2D cascade of {a.run} ({a.method}, tolerance {a.tolerance}, confidence {a.confidence}, budget {a.budget}); chain "
          f"{[list(p) for p in cascade.result['chain']]}")
    print("| split | full model top-1 % | cascade top-1 % | expected GFLOPs | of the full model |")
    print("|---|---|---|---|---|")
    for stage, r in results.items():
        what = "validation (other half)" if stage == "val" else "test (all)"
        print(f"| {what} | {r['full_top1']:.1f} | {100 * r['accuracy']:.1f} | {r['expected_flops'] / 1e9:.4f} | "
              f"{r['flops_fraction']:.2f} |")
    print(json.dumps({s: {k: r[k] for k in ("full_top1", "accuracy", "flops_fraction")} for s, r in results.items()}))
    return results


if __name__ == "__main__":
    main()
