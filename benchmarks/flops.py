"""FLOPs per image of ResNet-50 with and without BlurPool: the recipe's against timm's.

The MRL / FFCV recipe's BlurPool (``create_backbone("resnet50", blurpool=True)``, see
:mod:`mrl_vision.blurpool`) puts a fixed depthwise 3x3 blur before the six strided convs that read
>= 16 channels. timm's ``aa_layer=BlurPool2d`` (``backbone_kwargs: {aa_layer: blurpool}``) is a
different network: stem max-pool at stride 1 + blur, each strided conv2 at stride 1 + blur-subsample,
downsample path unblurred. This script counts both with ``torch.utils.flop_counter.FlopCounterMode``
(batch 1, on the CPU; a multiply-add counts as 2 FLOPs) for the backbone alone (no classifier).

    python benchmarks/flops.py                   # 224 px
    python benchmarks/flops.py --image-size 160  # the recipe's first training resolution
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrl_vision.backbones import create_backbone

VARIANTS = {
    "resnet50 (plain)": {},
    "resnet50 + reference BlurPool (recipe, blurpool=True)": {"blurpool": True},
    "resnet50 + timm BlurPool2d (aa_layer=blurpool)": {"aa_layer": "blurpool"},
}


def count(image_size: int, **kwargs) -> tuple[float, int, int]:
    """``(GFLOPs per image, parameters, buffers' elements)`` of ``create_backbone("resnet50", **kwargs)``."""
    model, _ = create_backbone("resnet50", **kwargs)
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return counter.get_total_flops() / 1e9, params, buffers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224, help="square input side in pixels (default 224)")
    args = ap.parse_args()
    if args.image_size < 32:
        ap.error(f"--image-size must be >= 32 (ResNet-50 downsamples 32x), got {args.image_size}")

    torch.manual_seed(0)
    rows = [(label, *count(args.image_size, **kw)) for label, kw in VARIANTS.items()]
    base = rows[0][1]
    print(f"ResNet-50 backbone (no classifier), {args.image_size}x{args.image_size} px, batch 1, "
          f"torch {torch.__version__}, FlopCounterMode on the CPU")
    name_w = max(len(r[0]) for r in rows)
    print(f"{'variant':<{name_w}}  {'GFLOPs/img':>10}  {'vs plain':>8}  {'params (M)':>10}  {'buffers (k)':>11}")
    for label, gflops, params, buffers in rows:
        print(f"{label:<{name_w}}  {gflops:>10.3f}  {gflops / base:>7.4f}x  {params / 1e6:>10.3f}  {buffers / 1e3:>11.1f}")


if __name__ == "__main__":
    main()
