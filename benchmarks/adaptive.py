"""Adaptive classification on a trained model: dimensions saved, accuracy kept, time taken.

For each threshold-fitting method (the reference's ``pairwise``; ``tolerance`` at 0.5 and 0.1 points;
``budget`` at 1.5x the three smallest sizes),
thresholds are fitted on the validation split and evaluated on the test split: top-1, expected dims,
the ratio largest size / expected dims, and whether the cascade stays within 0.5 / 0.1 points of the
largest size. Then the wall time of cascade inference against always using the largest size, for the
head alone (on precomputed embeddings) and end to end (backbone included), interleaved.

    python benchmarks/adaptive.py                        # trains the quickstart model first (~2 min on 2 cores)
    python benchmarks/adaptive.py --ckpt runs/quickstart/demo/checkpoints/last.ckpt
    python benchmarks/adaptive.py --ckpt CKPT --config configs/quickstart_ffcv.yaml   # any data module

The MRL paper reports, on ImageNet with ResNet-50, the accuracy of a 512-d model at about 37
expected dimensions (14x fewer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mrl_vision import adaptive as A
from mrl_vision.model import MatryoshkaModel
from mrl_vision.runs import load_run

REPO = Path(__file__).resolve().parents[1]


def load(ckpt: str | None, config: str | None, epochs: int, workdir: Path):
    """A trained model and its data module, from a checkpoint or a fresh quickstart fit."""
    from mrl_vision.cli import cli

    config = config or str(REPO / "configs" / "quickstart.yaml")
    base = ["--config", config, "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(workdir)]
    if ckpt is None:
        c = cli(["fit", *base, "--trainer.max_epochs", str(epochs)])
        ckpt = c.trainer.checkpoint_callback.last_model_path
    model, dm = load_run(ckpt, base)  # the data module, built from the same config
    return model, dm, ckpt


@torch.no_grad()
def collect(model: MatryoshkaModel, loader, transfer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """conf [G, N], preds [G, N], labels [N] and the input batches (for the timing runs)."""
    confs, preds, labels, batches = [], [], [], []
    for batch in loader:
        x, y = transfer(batch)
        c, p = A.confidences(model.eval_logits(x))
        confs.append(c)
        preds.append(p)
        labels.append(y.clone())
        batches.append(x.clone())
    return torch.cat(confs, 1), torch.cat(preds, 1), torch.cat(labels), batches


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="a checkpoint of mrl-vision fit (default: train the quickstart)")
    ap.add_argument("--config", default=None, help="config whose data module to evaluate on (default: quickstart)")
    ap.add_argument("--epochs", type=int, default=12, help="quickstart epochs when training here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="runs/bench_adaptive")
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its own arguments
    torch.manual_seed(0)
    model, dm, ckpt = load(args.ckpt, args.config, args.epochs, Path(args.workdir))
    dm.setup("validate")
    dm.setup("test")

    def transfer(batch):
        batch = dm.on_after_batch_transfer(batch, 0) if hasattr(dm, "on_after_batch_transfer") else batch
        return batch[0], batch[1]

    dims = list(model.dims)
    d = dims[-1]
    cv, pv, yv, _ = collect(model, dm.val_dataloader(), transfer)
    ct, pt, yt, batches = collect(model, dm.test_dataloader(), transfer)
    largest = float(pt[-1].eq(yt).double().mean())
    print(f"checkpoint {ckpt}; {model.backbone_name} {model.head_kind}, dims {dims}")
    print(f"calibration: validation split, {yv.numel()} images; evaluation: test split, {yt.numel()} images")
    print("fixed sizes, test top-1 %: " + ", ".join(f"{m}: {100 * float(pt[g].eq(yt).double().mean()):.2f}" for g, m in enumerate(dims)))

    fits: dict[str, torch.Tensor] = {"pairwise (reference)": A.fit_pairwise(cv, pv, yv, dims)}
    for tol in (0.005, 0.001):
        fits[f"tolerance {100 * tol:.1f} pt"] = A.fit_tolerance(cv, pv, yv, dims, tolerance=tol)
    for budget in (dims[0] * 1.5, dims[1] * 1.5, dims[2] * 1.5):
        fits[f"budget {budget:g} dims"] = A.fit_budget(cv, pv, yv, dims, budget=budget)

    print(f"\n== Cascades fitted on validation, evaluated on test (largest size {d}: {100 * largest:.2f} %) ==")
    print(f"{'method':<28}{'top-1 %':>9}{'exp. dims':>11}{'head cost':>11}{f'{d}/dims':>9}{'<=0.5 pt':>10}{'<=0.1 pt':>10}")
    for name, thr in fits.items():
        r = A.evaluate_cascade(ct, pt, yt, dims, thr)
        drop = 100 * (largest - r.accuracy)
        print(f"{name:<28}{100 * r.accuracy:>9.2f}{r.expected_dims:>11.2f}{r.expected_head_cost:>11.2f}"
              f"{d / r.expected_dims:>9.1f}{'yes' if drop <= 0.5 + 1e-9 else 'no':>10}{'yes' if drop <= 0.1 + 1e-9 else 'no':>10}")
    print("(MRL paper, ImageNet ResNet-50: the accuracy of a 512-d model at ~37 expected dims, 14x fewer)")

    thr = fits["tolerance 0.5 pt"]
    x_all = torch.cat(batches)
    with torch.no_grad():
        zs = [model.features(x_all)]

        def head_full():
            return sum(model.head.logits_at(z, d) for z in zs).argmax(-1)

        def head_cascade():
            return A.cascade_predict(model.head, zs, thr)

        def e2e_full():
            for x in batches:
                model.head.logits_at(model.features(x), d).argmax(-1)

        def e2e_cascade():
            for x in batches:
                model.predict_adaptive(x, thr)

        t = {}
        for _ in range(2):  # interleaved rounds
            for name, fn, reps in (("head full", head_full, 20 * args.repeats), ("head cascade", head_cascade, 20 * args.repeats),
                                   ("e2e full", e2e_full, args.repeats), ("e2e cascade", e2e_cascade, args.repeats)):
                t.setdefault(name, []).append(timed(fn, reps))
    t = {k: min(v) for k, v in t.items()}
    n = x_all.shape[0]
    print(f"\n== Wall time on {n} test images, {torch.get_num_threads()} CPU threads (median of repeats, best of 2 rounds) ==")
    print(f"head only:  largest size {1e3 * t['head full']:.3f} ms, cascade {1e3 * t['head cascade']:.3f} ms "
          f"({t['head full'] / t['head cascade']:.2f}x faster)")
    print(f"end to end: largest size {1e3 * t['e2e full']:.1f} ms, cascade {1e3 * t['e2e cascade']:.1f} ms "
          f"({t['e2e full'] / t['e2e cascade']:.2f}x faster; the backbone runs in both)")


if __name__ == "__main__":
    sys.exit(main())
