"""Per-sample analysis of a trained run: what the notebooks show beyond the per-size curves.

(:func:`mrl_vision.runs.load_run` brings a run folder back as its model and data module.)

- :func:`eval_outputs`: logits of every size ``[G, N, C]`` and labels over a loader;
- :func:`per_class_accuracy`, :func:`most_misclassified`: accuracy per class at one size, and the
  classes most often wrong there (with what they are taken for);
- :func:`exit_sizes`: where the adaptive cascade stops for each sample, and how often at each size.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .adaptive import confidences, exit_index, validate_thresholds
from .model import MatryoshkaModel


@torch.no_grad()
def eval_outputs(
    model: MatryoshkaModel, loader: Iterable, device: torch.device | str = "cpu", flip_tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation logits of every size ``[G, N, C]`` (float32, CPU) and labels ``[N]``."""
    model = model.to(device).eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(model.eval_logits(batch[0].to(device), flip_tta).float().cpu())
        labels.append(batch[1].reshape(-1).long().cpu().clone())
    if not logits:
        raise ValueError("the loader gave no batches")
    return torch.cat(logits, 1), torch.cat(labels)


def _size_index(dims: Sequence[int], dim: int) -> int:
    if dim not in dims:
        raise ValueError(f"dim={dim} is not one of the sizes of this model ({list(dims)})")
    return list(dims).index(dim)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, dims: Sequence[int], dim: int) -> torch.Tensor:
    """Top-1 (percent) of each class ``[C]`` at size ``dim`` (NaN for a class with no sample)."""
    pred = logits[_size_index(dims, dim)].argmax(-1)
    c = logits.shape[-1]
    total = torch.bincount(labels, minlength=c).float()
    right = torch.bincount(labels[pred == labels], minlength=c).float()
    return torch.where(total > 0, 100 * right / total.clamp_min(1), torch.full_like(total, float("nan")))


def most_misclassified(
    logits: torch.Tensor, labels: torch.Tensor, dims: Sequence[int], dim: int,
    classes: Sequence[str] | None = None, k: int = 5,
) -> list[dict]:
    """The ``k`` classes with the highest error rate at size ``dim``: rows ``{"class", "samples",
    "errors", "error %", "taken for"}`` (the wrong class chosen most often for it)."""
    pred = logits[_size_index(dims, dim)].argmax(-1)
    c = logits.shape[-1]
    names = list(classes) if classes is not None else [str(i) for i in range(c)]
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    rows = []
    for cls in range(c):
        total = int(confusion[cls].sum())
        wrong = confusion[cls].clone()
        wrong[cls] = 0
        errors = int(wrong.sum())
        if total == 0:
            continue
        rows.append({"class": names[cls], "samples": total, "errors": errors, "error %": 100.0 * errors / total,
                     "taken for": names[int(wrong.argmax())] if errors else "-"})
    rows.sort(key=lambda r: (-r["error %"], r["class"]))
    return rows[:k]


def exit_sizes(logits: torch.Tensor, thresholds: Sequence[float] | torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, dict[int, int]]:
    """The size at which the cascade answers each sample ``[N]`` and the count per size ``{m: n}``."""
    thr = validate_thresholds(thresholds, len(dims))
    conf, _ = confidences(logits)
    idx = exit_index(conf, thr)
    sizes = torch.tensor(list(dims))[idx]
    return sizes, {int(m): int((idx == g).sum()) for g, m in enumerate(dims)}
