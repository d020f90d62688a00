"""Post-hoc truncation of a standard model: the baselines that MRL is measured against.

A standard model (one classifier on the whole embedding) is trained once; afterwards, at each size
``m``, a linear classifier is fitted on features cut down to ``m`` dimensions:

- ``prefix``: the first ``m`` coordinates ``z[:, :m]`` of the frozen embedding (the MRL paper's
  "random features" linear probe: a standard model's coordinates come in no particular order);
- ``svd``: the projection of ``z`` on its top ``m`` principal directions (the right singular vectors
  of the centred training embeddings; the paper's "SVD" column, here followed by a fitted probe).

Both probes are multinomial logistic regressions on standardised features, fitted on the training
split by full-batch L-BFGS (deterministic), and scored on the evaluation split. Given several weight
decays, each size's probe takes the one most accurate on a selection split (the validation split),
never on the split it is scored on. For a model with a Matryoshka head, its own classifier at each
size sits beside the probes (``head_top1``): "MRL + probe" against "MRL's heads", like with like.
Plain tensors only: :func:`extract_embeddings` gets them from any model and loader.
"""

from __future__ import annotations

import json
import math
import numbers
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
    return probe_accuracies(train, y_train, [(test, y_test)], num_classes, weight_decay)[0]


def probe_accuracies(
    train: torch.Tensor, y_train: torch.Tensor, scored: Sequence[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
    weight_decay: float = 1e-4,
) -> list[float]:
    """Top-1 (fraction) on each ``(x, y)`` of ``scored`` of one linear probe fitted on standardised
    ``train`` features (each set standardised with the training mean and deviation)."""
    train, *xs = _standardise(train, *(x for x, _ in scored))
    w, b = fit_linear_probe(train, y_train, num_classes, weight_decay)
    return [(((x @ w.T + b).argmax(-1)) == y).float().mean().item() for x, (_, y) in zip(xs, scored)]


def weight_decays(weight_decay: float | Sequence[float]) -> list[float]:
    """``weight_decay`` as a non-empty list of finite values >= 0 (one number stands for itself)."""
    values = [weight_decay] if isinstance(weight_decay, numbers.Real) else list(weight_decay)
    if not values:
        raise ValueError("weight_decay is an empty list: give at least one value (e.g. 1e-4)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"weight decays must be finite numbers >= 0, got {v!r} in weight_decay={weight_decay!r}")
    return [float(v) for v in values]


def select_probe(
    train: torch.Tensor, y_train: torch.Tensor, select: torch.Tensor, y_select: torch.Tensor, test: torch.Tensor,
    y_test: torch.Tensor, num_classes: int, weight_decay: Sequence[float],
) -> tuple[float, float]:
    """``(top-1 on test, chosen weight decay)`` of the probe whose weight decay is the most accurate on
    ``select`` (the first listed among equals); each probe is fitted on ``train`` once."""
    best = None
    for wd in weight_decays(weight_decay):
        acc_select, acc_test = probe_accuracies(train, y_train, [(select, y_select), (test, y_test)], num_classes, wd)
        if best is None or acc_select > best[0]:
            best = (acc_select, acc_test, wd)
    return best[1], best[2]


def head_accuracies(head, z: torch.Tensor, y: torch.Tensor, sizes: Sequence[int]) -> list[float | None]:
    """Top-1 (fraction) of a classifier head's own logits at each size of ``sizes`` (``None`` where the
    head has no such size): ``head`` a :class:`~mrl_vision.heads.ClassifierHead`, ``z: [N, d]``, ``y: [N]``."""
    device = next(head.parameters()).device
    out: list[float | None] = []
    with torch.no_grad():
        for m in sizes:
            if m not in head.dims:
                out.append(None)
                continue
            logits = head.logits_at(z.to(device), m).float().cpu()
            out.append(logits.argmax(-1).eq(y).float().mean().item())
    return out


def svd_basis(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and principal directions ``[d, r]`` (columns, by decreasing singular value) of ``train``."""
    mean = train.double().mean(0)
    _, _, vh = torch.linalg.svd(train.double() - mean, full_matrices=False)
    return mean.float(), vh.T.float()


def truncation_table(
    z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor,
    sizes: Sequence[int], num_classes: int, weight_decay: float | Sequence[float] = 1e-4,
    z_select: torch.Tensor | None = None, y_select: torch.Tensor | None = None, head=None,
) -> list[dict]:
    """Rows ``{"dims", "prefix_top1", "svd_top1"}`` (percent) for each size in ``sizes``.

    One ``weight_decay``: every probe uses it. Several: at each size and for each probe, the one most
    accurate on ``(z_select, y_select)`` (needed then; never the test data), reported as ``prefix_wd``
    and ``svd_wd``. ``head`` (a :class:`~mrl_vision.heads.ClassifierHead`): its own top-1 on the test
    data at each size as ``head_top1`` (``None`` at sizes it does not have).

    Example::

        rows = truncation_table(z_tr, y_tr, z_te, y_te, [8, 64, 512], 100,
                                weight_decay=[1e-5, 1e-4, 1e-3, 1e-2], z_select=z_va, y_select=y_va)
    """
    width = z_train.shape[1]
    bad = [m for m in sizes if not isinstance(m, int) or not 1 <= m <= width]
    if bad:
        raise ValueError(f"sizes must be integers in [1, {width}] (the embedding width), got {bad}")
    if z_test.shape[1] != width:
        raise ValueError(f"train and test embeddings differ in width: {width} vs {z_test.shape[1]}")
    decays = weight_decays(weight_decay)
    select = len(decays) > 1
    if select and (z_select is None or y_select is None):
        raise ValueError(f"{len(decays)} weight decays {decays} need a selection set (z_select, y_select) to choose among them")
    if select and z_select.shape[1] != width:
        raise ValueError(f"train and selection embeddings differ in width: {width} vs {z_select.shape[1]}")
    mean, basis = svd_basis(z_train)
    own = head_accuracies(head, z_test, y_test, sizes) if head is not None else None
    rows = []
    for i, m in enumerate(sizes):
        v = basis[:, :m]
        views = {"prefix": lambda z: z[:, :m], "svd": lambda z: (z - mean) @ v}
        row: dict = {"dims": int(m)}
        chosen = {}
        for kind, view in views.items():
            if select:
                acc, chosen[kind] = select_probe(view(z_train), y_train, view(z_select), y_select, view(z_test), y_test,
                                                 num_classes, decays)
            else:
                acc = probe_accuracy(view(z_train), y_train, view(z_test), y_test, num_classes, decays[0])
            row[f"{kind}_top1"] = 100.0 * acc
        if own is not None:
            row["head_top1"] = None if own[i] is None else 100.0 * own[i]
        if select:
            row.update({f"{kind}_wd": wd for kind, wd in chosen.items()})
        rows.append(row)
    return rows


def truncate_model(
    model, datamodule, sizes: Sequence[int] | None = None, fit_split: str = "train", eval_split: str = "test",
    weight_decay: float | Sequence[float] = 1e-4, device: torch.device | str = "cpu", select_split: str = "val",
) -> tuple[list[dict], dict]:
    """:func:`truncation_table` of a trained :class:`~mrl_vision.model.MatryoshkaModel` with a classifier
    head on a :class:`~mrl_vision.data.MatryoshkaDataModule`'s splits (read through its
    ``eval_dataloader(split)``: evaluation transforms, in order); returns the rows and metadata, the
    model's own classifier accuracy at its largest size on ``eval_split`` included.

    Several ``weight_decay`` values: each probe's is chosen on ``select_split`` (which must differ
    from ``eval_split`` and ``fit_split``). A Matryoshka head (MRL, MRL-E) adds its own accuracy at each
    size (``head_top1``)."""
    from .data import MatryoshkaDataModule
    from .heads import MatryoshkaHead, default_dims

    if not isinstance(datamodule, MatryoshkaDataModule):
        raise ValueError(f"{type(datamodule).__name__} is not a MatryoshkaDataModule (it needs eval_dataloader(split))")
    if model.head is None:
        raise ValueError("truncation compares classifiers: this model has no classifier head")
    if datamodule.num_classes != model.num_classes:
        raise ValueError(f"the data has {datamodule.num_classes} classes, the model {model.num_classes}")
    decays = weight_decays(weight_decay)
    select = len(decays) > 1
    if select and select_split == eval_split:
        raise ValueError(f"select_split={select_split!r} is the evaluation split: choosing the weight decay on the data "
                         "the probes are scored on would flatter them; select on another split (e.g. val, scoring on test)")
    if select and select_split == fit_split:
        raise ValueError(f"select_split={select_split!r} is the split the probes are fitted on: it would always favour "
                         "the weakest penalty; select on another split")
    sizes = list(sizes) if sizes else default_dims(model.width)
    z_fit, y_fit = extract_embeddings(model, datamodule.eval_dataloader(fit_split), device)
    z_eval, y_eval = extract_embeddings(model, datamodule.eval_dataloader(eval_split), device)
    z_sel, y_sel = extract_embeddings(model, datamodule.eval_dataloader(select_split), device) if select else (None, None)
    head = model.head if isinstance(model.head, MatryoshkaHead) else None
    rows = truncation_table(z_fit, y_fit, z_eval, y_eval, sizes, model.num_classes, decays, z_sel, y_sel, head)
    with torch.no_grad():
        logits = model.head(z_eval.to(next(model.parameters()).device))[-1].cpu()
        own = logits.argmax(-1).eq(y_eval).float().mean().item()
    meta = {"backbone": model.backbone_name, "head": model.head_kind, "width": model.width,
            "largest_size": model.dims[-1], "fit_split": fit_split, "eval_split": eval_split,
            "num_fit": int(y_fit.numel()), "num_eval": int(y_eval.numel()),
            "weight_decay": decays if select else decays[0], "own_classifier_top1": 100 * own}
    if select:
        meta.update({"select_split": select_split, "num_select": int(y_sel.numel())})
    return rows, meta


def write_truncation(out_dir: str | os.PathLike, rows: list[dict], meta: dict) -> Path:
    """``truncation.csv`` (the rows) and ``truncation.json`` (``meta``) in ``out_dir``, crash-safe;
    returns the CSV's path (what ``mrl-vision report`` reads)."""
    from .report import rows_to_csv

    out = Path(out_dir)
    atomic_write_text(out / "truncation.csv", rows_to_csv(rows))
    atomic_write_text(out / "truncation.json", json.dumps(meta, indent=2) + "\n")
    return out / "truncation.csv"
