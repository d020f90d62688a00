"""Cost of the Matryoshka embedding loss against its base loss alone, measured side by side in one run.

One training step (forward + backward + SGD step) of the same timm backbone on two views of each image
(SimCLR-style, 2N rows), with

- ``base``: the pytorch-metric-learning loss on the full, L2-normalised embedding;
- ``matryoshka``: :class:`mrl_vision.embedding_loss.MatryoshkaEmbeddingLoss`, the same loss on all the
  default sizes (9 for a 2048-wide ResNet-50: 8 ... 2048);
- ``matryoshka, 2 sizes per step``: ``n_dims_per_step=2``.

The variants run interleaved, in an order rotated every round, so machine noise hits them alike; the
median step time of each is printed with its ratio to ``base``. Then the loss alone (embeddings in,
forward + backward) for each, which is what the wrapper adds.

    python benchmarks/embedding_loss_overhead.py                      # ResNet-50, 224 px (minutes on 2 cores)
    python benchmarks/embedding_loss_overhead.py --quick              # a smoke run with a tiny model

Target (issue 15): the wrapper over all 9 sizes <= 1.1x the base loss's step for ResNet-50 at 224 px.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.nn import functional as F

from mrl_vision.backbones import create_backbone
from mrl_vision.embedding_loss import MatryoshkaEmbeddingLoss
from mrl_vision.heads import default_dims


@torch.enable_grad()  # training steps, whatever the caller's grad mode
def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16, help="images per step (two views each: 2x rows)")
    p.add_argument("--loss", default="NTXentLoss", help="a pytorch-metric-learning loss class")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="test_resnet at 32 px, for a smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.backbone, a.image_size, a.repeats, a.warmup = "test_resnet", 32, 2, 1
    torch.manual_seed(0)
    backbone, width = create_backbone(a.backbone)
    dims = default_dims(width)
    base = MatryoshkaEmbeddingLoss(a.loss, [width], gather=False)  # the base loss on the full width alone
    variants = {
        "base": base,
        f"matryoshka ({len(dims)} sizes)": MatryoshkaEmbeddingLoss(a.loss, dims, gather=False),
        "matryoshka (2 sizes per step)": MatryoshkaEmbeddingLoss(a.loss, dims, n_dims_per_step=2, gather=False, seed=0),
    }
    opt = torch.optim.SGD(backbone.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(2 * a.batch, 3, a.image_size, a.image_size)
    ids = torch.arange(a.batch).repeat_interleave(2)  # two views of each image: one positive pair each
    backbone.train()

    def step(name: str) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        variants[name](backbone(x), ids).backward()
        opt.step()
        return time.perf_counter() - t0

    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.warmup + a.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = step(n)
            if r >= a.warmup:
                times[n].append(t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"{a.backbone} at {a.image_size} px, {a.batch} images x 2 views, {a.loss}, dims {dims}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'training step':<34}{'median s':>10}{'min s':>10}{'x base':>8}")
    for n in names:
        print(f"{n:<34}{med[n]:>10.3f}{min(times[n]):>10.3f}{med[n] / med['base']:>8.3f}")

    z0 = F.normalize(torch.randn(2 * a.batch, width), dim=1)
    print(f"{'the loss alone (fwd + bwd)':<34}{'median ms':>10}{'x base':>18}")
    alone = {}
    for n in names:
        runs = []
        for _ in range(20):
            z = z0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            variants[n](z, ids).backward()
            runs.append(time.perf_counter() - t0)
        alone[n] = statistics.median(runs)
    for n in names:
        print(f"{n:<34}{1e3 * alone[n]:>10.2f}{alone[n] / alone['base']:>18.2f}")
    return {n: med[n] / med["base"] for n in names}


if __name__ == "__main__":
    main()
