"""Post-hoc truncation of a standard model: the baselines that MRL is measured against.

A standard model (one classifier on the whole embedding) is trained once; afterwards, at each size
``m``, a linear classifier is fitted on features cut down to ``m`` dimensions:

- ``prefix``: the first ``m`` coordinates ``z[:, :m]`` of the frozen embedding (the MRL paper's
  "random features" linear probe: a standard model's coordinates come in no particular order);
- ``svd``: the projection of ``z`` on its top ``m`` principal directions (the right singular vectors
  of the centred training embeddings; the paper's "SVD" column, here followed by a fitted probe).

Both probes are multinomial logistic regressions on standardised features, fitted on the training
split by full-batch L-BFGS (deterministic), and scored on the evaluation split. Plain tensors only:
:func:`extract_embeddings` gets them from any model and loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch.nn import functional as F

from .files import atomic_write_text


@torch.no_grad()
def extract_embeddings(model, loader: Iterable, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's pooled embeddings ``z: [N, d]`` (float32, CPU) and labels ``[N]`` of every batch."""
    model = model.to(device).eval()
    zs, ys = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        zs.append(model.features(x.to(device)).float().cpu())
        ys.append(y.reshape(-1).long().cpu().clone())
    if not zs:
        raise ValueError("the loader gave no batches")
    return torch.cat(zs), torch.cat(ys)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``x @ W.T + b`` fitted by full-batch L-BFGS; returns ``(W, b)``.

    ``weight_decay`` is the L2 penalty on ``W`` (mean loss + ``weight_decay / 2 * |W|^2``).
    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x [N, d] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got {int(y.min())}..{int(y.max())}")
    x = x.float()
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(
    train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, num_classes: int,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 (fraction) on ``test`` of a linear probe fitted on standardised ``train`` features."""
    train, test = _standardise(train, test)
    w, b = fit_linear_probe(train, y_train, num_classes, weight_decay)
    return (((test @ w.T + b).argmax(-1)) == y_test).float().mean().item()


def svd_basis(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and principal directions ``[d, r]`` (columns, by decreasing singular value) of ``train``."""
    mean = train.double().mean(0)
    _, _, vh = torch.linalg.svd(train.double() - mean, full_matrices=False)
    return mean.float(), vh.T.float()


def truncation_table(
    z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor,
    sizes: Sequence[int], num_classes: int, weight_decay: float = 1e-4,
) -> list[dict]:
    """Rows ``{"dims", "prefix_top1", "svd_top1"}`` (percent) for each size in ``sizes``."""
    width = z_train.shape[1]
    bad = [m for m in sizes if not isinstance(m, int) or not 1 <= m <= width]
    if bad:
        raise ValueError(f"sizes must be integers in [1, {width}] (the embedding width), got {bad}")
    if z_test.shape[1] != width:
        raise ValueError(f"train and test embeddings differ in width: {width} vs {z_test.shape[1]}")
    mean, basis = svd_basis(z_train)
    rows = []
    for m in sizes:
        prefix = probe_accuracy(z_train[:, :m], y_train, z_test[:, :m], y_test, num_classes, weight_decay)
        v = basis[:, :m]
        svd = probe_accuracy((z_train - mean) @ v, y_train, (z_test - mean) @ v, y_test, num_classes, weight_decay)
        rows.append({"dims": int(m), "prefix_top1": 100.0 * prefix, "svd_top1": 100.0 * svd})
    return rows


def truncate_model(
    model, datamodule, sizes: Sequence[int] | None = None, fit_split: str = "train", eval_split: str = "test",
    weight_decay: float = 1e-4, device: torch.device | str = "cpu",
) -> tuple[list[dict], dict]:
    """:func:`truncation_table` of a trained :class:`~mrl_vision.model.MatryoshkaModel` with a classifier
    head on a :class:`~mrl_vision.data.MatryoshkaDataModule`'s splits (read through its
    ``eval_dataloader(split)``: evaluation transforms, in order); returns the rows and metadata, the
    model's own classifier accuracy at its largest size on ``eval_split`` included."""
    from .data import MatryoshkaDataModule
    from .heads import default_dims

    if not isinstance(datamodule, MatryoshkaDataModule):
        raise ValueError(f"{type(datamodule).__name__} is not a MatryoshkaDataModule (it needs eval_dataloader(split))")
    if model.head is None:
        raise ValueError("truncation compares classifiers: this model has no classifier head")
    if datamodule.num_classes != model.num_classes:
        raise ValueError(f"the data has {datamodule.num_classes} classes, the model {model.num_classes}")
    sizes = list(sizes) if sizes else default_dims(model.width)
    z_fit, y_fit = extract_embeddings(model, datamodule.eval_dataloader(fit_split), device)
    z_eval, y_eval = extract_embeddings(model, datamodule.eval_dataloader(eval_split), device)
    rows = truncation_table(z_fit, y_fit, z_eval, y_eval, sizes, model.num_classes, weight_decay)
    with torch.no_grad():
        logits = model.head(z_eval.to(next(model.parameters()).device))[-1].cpu()
        own = logits.argmax(-1).eq(y_eval).float().mean().item()
    meta = {"backbone": model.backbone_name, "head": model.head_kind, "width": model.width,
            "largest_size": model.dims[-1], "fit_split": fit_split, "eval_split": eval_split,
            "num_fit": int(y_fit.numel()), "num_eval": int(y_eval.numel()), "weight_decay": weight_decay,
            "own_classifier_top1": 100 * own}
    return rows, meta


def write_truncation(out_dir: str | os.PathLike, rows: list[dict], meta: dict) -> Path:
    """``truncation.csv`` (the rows) and ``truncation.json`` (``meta``) in ``out_dir``, crash-safe;
    returns the CSV's path (what ``mrl-vision report`` reads)."""
    from .report import rows_to_csv

    out = Path(out_dir)
    atomic_write_text(out / "truncation.csv", rows_to_csv(rows))
    atomic_write_text(out / "truncation.json", json.dumps(meta, indent=2) + "\n")
    return out / "truncation.csv"
