"""2D Matryoshka: what cutting a ViT after k blocks saves, and what 2D training costs over 1D MRL.

(a) Depth. For k = L/4, L/2, 3L/4 and L blocks (L the depth): FLOPs per image of the backbone up to
    block k plus the head at the largest size (``mrl_vision.cascade2d.block_flops`` / ``head_flops``,
    torch's FlopCounterMode; a multiply-add is 2 FLOPs) and measured images/s of the model cut with
    ``MatryoshkaModel.truncate(k)`` (eval, no autograd, classifying at the largest size), each with its
    ratio to the full depth. The depths run interleaved, in an order rotated every round, after a
    warm-up; the median time of each is reported.
(b) Training step. Forward + backward + AdamW step of ``MatryoshkaClassifier._shared_step(batch,
    "train", i)`` with 2D Matryoshka (``matryoshka_2d={}``: the last block and one earlier block drawn
    per step, with the KL term) against 1D MRL (``matryoshka_2d=None``), same initial weights, on the
    same batches, interleaved; medians and their ratio (target <= 1.15x).

Real images: the quickstart digits (``QuickstartDataModule``, resized to ``--img-size``), taken from
its training loader. Weights are random: timing and FLOPs do not depend on them.

    python benchmarks/matryoshka_2d.py                    # the 2D config's model (about 2 minutes on 2 cores)
    python benchmarks/matryoshka_2d.py --backbone vit_small_patch16_224 --img-size 64 --patch-size 8
    python benchmarks/matryoshka_2d.py --device cuda --batch 256
    python benchmarks/matryoshka_2d.py --threads 1        # on a CPU shared with other jobs (see below)

On a 2-core machine busy with other work, two intra-op threads wait on each other: a ViT-Tiny batch
measured ~10x slower with 2 threads than with 1 there, so pass ``--threads 1`` on such a machine.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
import warnings

import torch

from mrl_vision import MatryoshkaClassifier, MatryoshkaModel
from mrl_vision.cascade2d import block_flops, head_flops
from mrl_vision.data import QuickstartDataModule
from mrl_vision.optim import build_optimizer

TARGET = 1.15  # 2D step time / 1D step time


def digit_batches(img_size: int, batch: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches of real digits on ``device`` (the loader cycled if it is shorter)."""
    dm = QuickstartDataModule(image_size=img_size, batch_size=batch)
    dm.setup("fit")
    loader = itertools.cycle(dm.train_dataloader())
    out = []
    for _ in range(count):
        x, y = next(loader)[:2]
        out.append((x.to(device), y.to(device)))
    return out


def timer(device: torch.device):
    """A function that runs ``fn`` once and returns its wall time (synchronised on a GPU)."""
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    return run


def depth_rows(model_kwargs: dict, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
               warmup: int, repeats: int) -> list[dict]:
    """(a): FLOPs and images/s of the model cut after k = L/4, L/2, 3L/4, L blocks."""
    torch.manual_seed(0)
    full = MatryoshkaModel(**model_kwargs).to(device).eval()
    depth = full.depth
    if depth is None:
        raise SystemExit(f"{model_kwargs['backbone']!r} has no stack of blocks of one width: pick a ViT, DeiT or EVA")
    ks = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})
    flops = dict(zip(ks, block_flops(full, ks)))
    head = head_flops(full)[-1]
    models = {k: copy.deepcopy(full).truncate(k).eval() for k in ks}
    x = batch[0]
    time_once = timer(device)

    def forward(m: MatryoshkaModel):
        with torch.no_grad():
            return m.head.logits_at(m.features(x), m.dims[-1]).argmax(-1)

    times: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(warmup + repeats):
        for k in ks[r % len(ks):] + ks[: r % len(ks)]:  # rotate the order: no depth always runs first
            t = time_once(lambda m=models[k]: forward(m))
            if r >= warmup:
                times[k].append(t)
    rows = []
    for k in ks:
        median = statistics.median(times[k])
        rows.append({"blocks": k, "gflops": (flops[k] + head) / 1e9, "images_per_s": x.shape[0] / median,
                     "median_ms": 1e3 * median})
    last = rows[-1]
    for r in rows:
        r["flops_ratio"] = r["gflops"] / last["gflops"]
        r["speedup"] = r["images_per_s"] / last["images_per_s"]
    return rows


def train_step_times(model_kwargs: dict, batches: list, device: torch.device, warmup: int) -> dict[str, list[float]]:
    """(b): step times of the 1D and 2D tasks, interleaved on the same batches."""
    tasks, opts = {}, {}
    for name, opts_2d in (("1D MRL", None), ("2D Matryoshka", {})):
        torch.manual_seed(0)  # the same initial weights
        task = MatryoshkaClassifier(matryoshka_2d=opts_2d, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                                    **model_kwargs).to(device).train()
        tasks[name] = task
        opts[name] = build_optimizer(task.model, "adamw", 1e-3, 0.05)
    time_once = timer(device)

    def step(name: str, i: int, batch) -> None:
        opts[name].zero_grad(set_to_none=True)
        loss = tasks[name]._shared_step(batch, "train", i)
        loss.backward()
        opts[name].step()

    names = list(tasks)
    times: dict[str, list[float]] = {n: [] for n in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: the task's logging is off
        for i, batch in enumerate(batches):
            for name in names[i % 2:] + names[: i % 2]:
                t = time_once(lambda name=name: step(name, i, batch))
                if i >= warmup:
                    times[name].append(t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_tiny_patch16_224", help="a timm ViT/DeiT/EVA (default: the 2D config's)")
    ap.add_argument("--img-size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--patch-size", type=int, default=8, help="ViT patch size (default 8)")
    ap.add_argument("--num-classes", type=int, default=10, help="classes of the head (>= 10, the digits')")
    ap.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--repeats", type=int, default=12, help="timed forward passes per depth (default 12)")
    ap.add_argument("--steps", type=int, default=16, help="timed training steps per variant (default 16)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    for name in ("img_size", "patch_size", "batch", "repeats", "steps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_classes < 10:
        ap.error(f"--num-classes must be >= 10 (the digits have 10 labels), got {args.num_classes}")
    if args.img_size % args.patch_size:
        ap.error(f"--img-size {args.img_size} must be a multiple of --patch-size {args.patch_size}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here")

    model_kwargs = {"backbone": args.backbone, "num_classes": args.num_classes, "input_size": args.img_size,
                    "backbone_kwargs": {"img_size": args.img_size, "patch_size": args.patch_size}}
    batches = digit_batches(args.img_size, args.batch, args.warmup + args.steps, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {where}")
    print(f"{args.backbone}, {args.img_size} px, patch {args.patch_size}, {args.num_classes} classes, batch {args.batch}, "
          "quickstart digits")

    rows = depth_rows(model_kwargs, batches[0], device, args.warmup, args.repeats)
    print(f"\n== (a) The model cut after k blocks: eval, no autograd, classifying at the largest size "
          f"(median of {args.repeats}, interleaved) ==")
    print(f"{'blocks':>6}{'GFLOPs/img':>12}{'x full':>8}{'images/s':>11}{'x full':>8}{'ms/batch':>10}")
    for r in rows:
        print(f"{r['blocks']:>6}{r['gflops']:>12.4f}{r['flops_ratio']:>8.3f}{r['images_per_s']:>11.1f}"
              f"{r['speedup']:>8.2f}{r['median_ms']:>10.1f}")

    times = train_step_times(model_kwargs, batches, device, args.warmup)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    ratio = med["2D Matryoshka"] / med["1D MRL"]
    print(f"\n== (b) One training step (forward + backward + AdamW step), {args.steps} steps each, interleaved ==")
    print(f"{'variant':<16}{'median ms':>11}{'min ms':>9}{'max ms':>9}")
    for name, ts in times.items():
        print(f"{name:<16}{1e3 * med[name]:>11.1f}{1e3 * min(ts):>9.1f}{1e3 * max(ts):>9.1f}")
    print(f"2D / 1D (medians): {ratio:.3f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")

    if args.json:
        result = {"args": vars(args), "torch": torch.__version__, "device": where, "depth": rows,
                  "train_step_s": times, "train_step_ratio": ratio}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
