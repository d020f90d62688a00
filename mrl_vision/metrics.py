"""Per-size metrics as torchmetrics ``Metric`` objects: top-k accuracy of the classifiers
(:class:`MatryoshkaAccuracy`) and retrieval of the embedding (:class:`MatryoshkaRetrieval`).

One metric object holds the correct counts of every (size, k) pair, so a batch
updates them all in one vectorised pass (a single ``topk`` over ``[G, N, C]``) and DDP
syncs them in one all-reduce. The accuracy is micro-averaged (ImageNet's top-1: correct
samples over all samples), not torchmetrics' per-class default.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class MatryoshkaAccuracy(Metric):
    """Top-k accuracy for every size.

    Args:
        dims: the sizes, in the order of the logits' first axis (or names of the rows: the 2D grid's
            ``L6/64`` gives ``top1@L6/64``).
        num_classes: C; a k above C is dropped (top-5 of a 3-class problem is meaningless).
        top_k: the k values to track.

    ``update(logits: [G, N, C], target: [N])``; ``compute()`` returns
    ``{"top1@8": tensor, "top5@8": tensor, ...}`` with values in [0, 1].

    Example::

        acc = MatryoshkaAccuracy([8, 16, 32], num_classes=10)
        acc.update(logits, y)
        acc.compute()["top1@16"]
    """

    full_state_update = False
    higher_is_better = True
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, dims: Sequence[int | str], num_classes: int, top_k: Sequence[int] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.dims = list(dims)
        self.num_classes = num_classes
        bad = [k for k in top_k if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad:
            raise ValueError(f"top_k values must be integers >= 1, got {bad[0]!r} in top_k={list(top_k)}")
        self.top_k = [k for k in top_k if k <= num_classes]
        if not self.top_k:
            raise ValueError(f"no k in top_k={list(top_k)} is <= num_classes={num_classes}")
        self.add_state("correct", torch.zeros(len(self.dims), len(self.top_k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if (
            logits.ndim != 3
            or target.ndim != 1
            or logits.shape[0] != len(self.dims)
            or logits.shape[1] != target.shape[0]
            or logits.shape[2] != self.num_classes
        ):
            raise ValueError(
                f"expected logits [G={len(self.dims)}, N, C={self.num_classes}] and target [N], "
                f"got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        kmax = max(self.top_k)
        hits = logits.topk(kmax, dim=-1).indices.eq(target[None, :, None])  # [G, N, kmax]
        hits = hits.cumsum(-1).clamp_(max=1)  # hit within the first k, for every k
        ks = torch.tensor([k - 1 for k in self.top_k], device=logits.device)
        self.correct += hits.index_select(-1, ks).sum(1)
        self.total += target.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        acc = self.correct.double() / self.total.clamp(min=1)
        return {
            f"top{k}@{m}": acc[g, j].float()
            for g, m in enumerate(self.dims)
            for j, k in enumerate(self.top_k)
        }


class MatryoshkaRetrieval(Metric):
    """Per-size retrieval within a split, the deep-metric-learning protocol: every image queries all the
    others (leave one out) with the first ``m`` dims of its embedding, L2-normalised, by cosine similarity
    (:func:`mrl_vision.retrieval.leave_one_out_search`). The classes need not be the training classes.

    Args:
        dims: the sizes.
        recall_at: the K of ``recall{K}@{m}``: the fraction of queries with an image of their class among
            their K nearest (Recall@K of the metric-learning literature).
        knn_k: the neighbours of ``knn_top1@{m}``, a majority vote (a tie goes to the nearer label).

    ``update(embeddings [N, >= max(dims)], labels [N])`` keeps the embeddings (float32; gathered across
    DDP ranks when computed); ``compute()`` returns ``{"recall1@8": tensor, ..., "knn_top1@8": ...}`` in [0, 1].
    """

    full_state_update = False
    higher_is_better = True
    embeddings: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __init__(self, dims: Sequence[int], recall_at: Sequence[int] = (1, 2, 4, 8), knn_k: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dims = list(dims)
        bad = [k for k in (*recall_at, knn_k) if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad:
            raise ValueError(f"recall_at and knn_k must be integers >= 1, got {bad[0]!r}")
        self.recall_at, self.knn_k = sorted(set(recall_at)), knn_k
        self.add_state("embeddings", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0] \
                or embeddings.shape[1] < self.dims[-1]:
            raise ValueError(f"expected embeddings [N, >= {self.dims[-1]}] and labels [N], got "
                             f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
        self.embeddings.append(embeddings.detach()[:, : self.dims[-1]].float())
        self.labels.append(labels.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        from .retrieval import knn_vote, leave_one_out_search, normalize_prefix

        z, y = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels)
        n = y.shape[0]
        k = min(max(*self.recall_at, self.knn_k), n - 1)
        if k < 1:
            raise ValueError(f"retrieval within a split needs at least 2 samples, got {n}")
        out = {}
        for m in self.dims:
            near = y[leave_one_out_search(normalize_prefix(z, m), k)]  # [N, k] neighbour labels
            hit = (near == y.unsqueeze(1)).cumsum(1).clamp(max=1)
            for r in self.recall_at:
                out[f"recall{r}@{m}"] = hit[:, min(r, k) - 1].double().mean().float()
            out[f"knn_top1@{m}"] = (knn_vote(near[:, : min(self.knn_k, k)]) == y).double().mean().float()
        return out
