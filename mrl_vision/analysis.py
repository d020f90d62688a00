"""Per-sample analysis of a trained run: what the notebooks show beyond the per-size curves.

- :func:`load_run_model` / :func:`load_run_datamodule`: a run folder (``runs/NAME/VERSION``, as the
  CLI writes it) back to its model (``checkpoints/last.ckpt``) and data module (``config.yaml``);
- :func:`eval_outputs`: logits of every size ``[G, N, C]`` and labels over a loader;
- :func:`per_class_accuracy`, :func:`most_misclassified`: accuracy per class at one size, and the
  classes most often wrong there (with what they are taken for);
- :func:`exit_sizes`: where the adaptive cascade stops for each sample, and how often at each size.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .adaptive import confidences, exit_index, validate_thresholds
from .model import MatryoshkaClassifier


def load_run_model(run_dir: str | os.PathLike, checkpoint: str = "last.ckpt") -> MatryoshkaClassifier:
    """The model of a ``fit`` run folder, from ``RUN/checkpoints/{checkpoint}``, in eval mode on the CPU."""
    path = Path(run_dir) / "checkpoints" / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {str(path)!r}: give the folder of a fit run (runs/NAME/VERSION)")
    return MatryoshkaClassifier.load_from_checkpoint(str(path), map_location="cpu").eval()


def load_run_datamodule(run_dir: str | os.PathLike):
    """The data module a run used, rebuilt from the ``config.yaml`` that ``mrl-vision`` saved in it."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no {str(path)!r}: give a run folder written by mrl-vision fit/test")
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    if "class_path" not in data:
        raise ValueError(f"{str(path)!r} names no data module (data.class_path)")
    module, _, name = data["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(data.get("init_args") or {}))


@torch.no_grad()
def eval_outputs(model: MatryoshkaClassifier, loader: Iterable, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation logits of every nesting size ``[G, N, C]`` (float32, CPU) and labels ``[N]``."""
    model = model.to(device).eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(model.eval_logits(batch[0].to(device)).float().cpu())
        labels.append(batch[1].reshape(-1).long().cpu().clone())
    if not logits:
        raise ValueError("the loader gave no batches")
    return torch.cat(logits, 1), torch.cat(labels)


def _size_index(nesting: Sequence[int], dims: int) -> int:
    if dims not in nesting:
        raise ValueError(f"dims={dims} is not a nesting size of this model ({list(nesting)})")
    return list(nesting).index(dims)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, nesting: Sequence[int], dims: int) -> torch.Tensor:
    """Top-1 (percent) of each class ``[C]`` at size ``dims`` (NaN for a class with no sample)."""
    pred = logits[_size_index(nesting, dims)].argmax(-1)
    c = logits.shape[-1]
    total = torch.bincount(labels, minlength=c).float()
    right = torch.bincount(labels[pred == labels], minlength=c).float()
    return torch.where(total > 0, 100 * right / total.clamp_min(1), torch.full_like(total, float("nan")))


def most_misclassified(
    logits: torch.Tensor, labels: torch.Tensor, nesting: Sequence[int], dims: int,
    classes: Sequence[str] | None = None, k: int = 5,
) -> list[dict]:
    """The ``k`` classes with the highest error rate at size ``dims``: rows ``{"class", "samples",
    "errors", "error %", "taken for"}`` (the wrong class chosen most often for it)."""
    pred = logits[_size_index(nesting, dims)].argmax(-1)
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


def exit_sizes(logits: torch.Tensor, thresholds: Sequence[float] | torch.Tensor, nesting: Sequence[int]) -> tuple[torch.Tensor, dict[int, int]]:
    """The size at which the cascade answers each sample ``[N]`` and the count per size ``{m: n}``."""
    thr = validate_thresholds(thresholds, len(nesting))
    conf, _ = confidences(logits)
    idx = exit_index(conf, thr)
    sizes = torch.tensor(list(nesting))[idx]
    return sizes, {int(m): int((idx == g).sum()) for g, m in enumerate(nesting)}
