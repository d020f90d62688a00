"""Cost of the Matryoshka heads against a plain linear head, measured side by side in one run.

1. One training step (forward + backward + SGD step) of the same timm backbone with a plain
   ``Linear(d, C)`` head + cross-entropy, the MRL head + MatryoshkaLoss, and the MRL-E head +
   MatryoshkaLoss. The variants run interleaved, in an order rotated every round, so machine noise
   hits them alike; the median step time of each is reported with its ratio to plain.
2. The head alone, ``z: [N, d] -> logits``: one full-width linear, the fused MRL-E (all sizes in
   one pass), the naive MRL-E loop (one matmul per size) and MRL (one Linear per size),
   forward and forward + backward, through ``torch.utils.benchmark``.

    python benchmarks/head_overhead.py                 # both default settings (about 2 minutes on 2 cores)
    python benchmarks/head_overhead.py --quick         # a smoke run with tiny models

Targets (issue 2): MRL and MRL-E steps within 1.03x of plain; fused MRL-E head <= 1.3x one linear.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import benchmark

from mrl_vision.backbones import create_backbone
from mrl_vision.heads import MatryoshkaHead, default_dims
from mrl_vision.losses import MatryoshkaLoss


def step_times(backbone_name: str, num_classes: int, image_size: int, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median and min step time of each variant, and each head's own forward + backward time."""
    torch.manual_seed(0)
    backbone, width = create_backbone(backbone_name)
    dims = default_dims(width)
    heads = {
        "plain": (nn.Linear(width, num_classes), F.cross_entropy),
        "MRL": (MatryoshkaHead(width, num_classes, dims), MatryoshkaLoss(len(dims))),
        "MRL-E": (MatryoshkaHead(width, num_classes, dims, efficient=True), MatryoshkaLoss(len(dims))),
    }
    params = list(backbone.parameters()) + [p for h, _ in heads.values() for p in h.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, num_classes, (batch,))
    backbone.train()

    def step(name: str) -> float:
        head, loss_fn = heads[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(backbone(x)), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in heads}
    names = list(heads)
    for r in range(warmup + repeats):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: no variant always runs first
            t = step(name)
            if r >= warmup:
                times[name].append(t)
    result = {f"{n} median": statistics.median(ts) for n, ts in times.items()}
    result.update({f"{n} min": min(ts) for n, ts in times.items()})
    # The heads' own cost, timed precisely in isolation (head + loss, forward + backward on the
    # embedding), gives a noise-free estimate of the step ratio: 1 + (head - plain head) / step.
    z = torch.randn(batch, width, requires_grad=True)
    for name, (head, loss_fn) in heads.items():
        def fwd_bwd(head=head, loss_fn=loss_fn):
            loss_fn(head(z), y).backward()

        result[f"{name} head"] = benchmark.Timer("f()", globals={"f": fwd_bwd}).blocked_autorange(min_run_time=0.5).median
    return result


def head_times(width: int, num_classes: int, batch: int, min_run_time: float) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    dims = default_dims(width)
    z = torch.randn(batch, width, requires_grad=True)
    full = nn.Linear(width, num_classes)
    fused = MatryoshkaHead(width, num_classes, dims, efficient=True)
    mrl = MatryoshkaHead(width, num_classes, dims)
    w, b = fused.linear.weight, fused.linear.bias

    def naive(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z[:, :m] @ w[:, :m].T + b for m in dims])

    variants = {
        "one full-width linear": lambda: full(z),
        "MRL-E fused (all sizes)": lambda: fused(z),
        "MRL-E naive loop": lambda: naive(z),
        "MRL (G linears)": lambda: mrl(z),
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in variants.items():
        fwd = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median
        with torch.no_grad():
            fwd_ng = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median

        def fwd_bwd(fn=fn):
            out = fn()
            (out.float().square().mean()).backward()

        bwd = benchmark.Timer("f()", globals={"f": fwd_bwd}).blocked_autorange(min_run_time=min_run_time).median
        out[name] = {"forward (no grad)": fwd_ng, "forward": fwd, "forward+backward": bwd}
        z.grad = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU")

    if args.quick:
        settings = [("test_resnet", 10, 32, 16)]
        repeats, warmup, head_cfg, min_t = 3, 1, (96, 10, 64), 0.05
    else:
        settings = [("resnet50", 1000, 224, 16), ("resnet18", 10, 32, 128)]
        repeats, warmup, head_cfg, min_t = args.repeats, 2, (2048, 1000, 256), 0.5

    print("\n== One training step (forward + backward + SGD step), interleaved runs ==")
    print("ratio to plain: median step / min step / estimate from the heads' own cost (1 + extra head time / step)")
    print(f"{'backbone':<12}{'classes':>8}{'px':>5}{'batch':>6}{'plain ms':>10}{'MRL ms':>9}{'MRL-E ms':>10}   {'MRL/plain':<25}{'MRL-E/plain':<25}")
    for name, classes, px, batch in settings:
        t = step_times(name, classes, px, batch, repeats, warmup)
        step = t["plain median"]

        def ratios(v: str) -> str:
            est = 1 + (t[f"{v} head"] - t["plain head"]) / step
            return f"{t[f'{v} median'] / step:.3f} / {t[f'{v} min'] / t['plain min']:.3f} / {est:.4f}"

        print(
            f"{name:<12}{classes:>8}{px:>5}{batch:>6}{1e3 * step:>10.1f}{1e3 * t['MRL median']:>9.1f}"
            f"{1e3 * t['MRL-E median']:>10.1f}   {ratios('MRL'):<25}{ratios('MRL-E'):<25}"
        )

    width, classes, batch = head_cfg
    print(f"\n== The head alone: z [{batch}, {width}] -> {classes} classes, {len(default_dims(width))} sizes ==")
    res = head_times(width, classes, batch, min_t)
    base = res["one full-width linear"]
    cols = list(base)
    print(f"{'variant':<26}" + "".join(f"{c + ' us':>22}{'x linear':>10}" for c in cols))
    for name, r in res.items():
        print(f"{name:<26}" + "".join(f"{1e6 * r[c]:>22.1f}{r[c] / base[c]:>10.2f}" for c in cols))
    fused, naive = res["MRL-E fused (all sizes)"], res["MRL-E naive loop"]
    print("\nfused MRL-E vs naive loop: " + ", ".join(f"{c} {naive[c] / fused[c]:.2f}x faster" for c in cols))


if __name__ == "__main__":
    main()
