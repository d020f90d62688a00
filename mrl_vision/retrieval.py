"""Image retrieval with Matryoshka embeddings: search, cascades and ranking metrics.

Every prefix ``z[:, :m]`` of a Matryoshka embedding is an embedding by itself. As in the MRL
reference code, the database is the training split's embeddings and the queries are the test
split's; each prefix is L2-normalised *after* truncation (:func:`normalize_prefix`) and neighbours
are ranked by inner product (= cosine similarity). Everything here works on plain tensors (no
Lightning). The exact backend is a chunked torch matmul (CPU or GPU, no extra dependency); the
approximate backends come from faiss, an optional dependency (``pip install "mrl-vision[retrieval]"``),
imported only when one of them is asked for.

Searches
    - :func:`search`: the ``k`` nearest database rows at one prefix size, through an index
      (:data:`INDEX_KINDS`; :func:`build_index` / :class:`SearchIndex`).
    - :func:`adaptive_search`: shortlist ``shortlist`` candidates at ``shortlist_dim`` dims from an
      index, then re-rank them exactly at ``rerank_dim`` dims (:func:`rerank`).
    - :func:`funnel_search`: stages ``[(d1, n1), (d2, n2), ...]``: stage 1 searches the database at
      ``d1`` dims for ``n1`` candidates, each later stage re-ranks the previous stage's candidates
      exactly at ``d_i`` dims and keeps ``n_i``.

Cost model (:func:`search_cost`), in multiply-adds per query, ignoring normalisation, sorting and
index overheads (what an exhaustive search would cost; an HNSW index visits far fewer rows)::

    cost = N * d1 + sum_{i >= 2} n_{i-1} * d_i

so a full search at ``D`` dims costs ``N * D`` and the adaptive search ``N * Ds + shortlist * Dr``.

Metrics at ``k`` (:func:`retrieval_metrics`, all in percent, averaged over queries). A neighbour is
*relevant* when its label equals the query's label; ``R`` is the number of database items with
the query's label.
    - ``nn1_top1``: the first neighbour's label is the query's; ``knn_top1``: majority vote of the
      first ``k`` labels (a tie goes to the tied label met first in rank order).
    - Average precision, two conventions. Both sum ``precision@j`` over the relevant ranks
      ``j <= k``; ``map_at_K_ref`` divides that sum by ``k`` (the MRL reference code's convention,
      which cannot reach 100 when ``R < k``), ``map_at_K`` by ``min(k, R)`` (the usual convention).
    - ``precision_at_K`` = hits / k; ``recall_at_K`` = hits / R; ``hit_at_K``: any hit in the top k.
    - A query whose label has no item in the database (``R = 0``) gets AP 0 and recall 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from .heads import default_dims, validate_dims

INDEX_KINDS: tuple[str, ...] = ("exact", "flat", "hnsw", "fp16", "sq8")
INDEX_OPTIONS: tuple[str, ...] = ("hnsw_m", "ef_search", "ef_construction")

_FAISS_HINT = 'pip install "mrl-vision[retrieval]" (or pip install faiss-cpu)'


def _import_faiss():
    """faiss, imported lazily; an ImportError with the install command when it is missing."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"the faiss index kinds {INDEX_KINDS[1:]} need faiss: {_FAISS_HINT}") from err
    return faiss


# ----------------------------------------------------------------------------- validation helpers
def _check_int(value, name: str, low: int = 1) -> int:
    """``value`` as an int ``>= low``; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    """A non-empty 2-D tensor ``[N, d]``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [N, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x


def _check_pair(database: torch.Tensor, queries: torch.Tensor) -> tuple[int, int]:
    """Database and queries: non-empty matrices of one width on one device; returns ``(N, width)``."""
    _check_matrix(database, "database")
    _check_matrix(queries, "queries")
    if database.shape[1] != queries.shape[1]:
        raise ValueError(
            f"queries have width {queries.shape[1]} but the database has width {database.shape[1]}"
        )
    if database.device != queries.device:
        raise ValueError(f"queries are on {queries.device} but the database is on {database.device}")
    return database.shape[0], database.shape[1]


def _check_dim(dim, width: int, name: str = "dim") -> int:
    """A prefix size in ``[1, width]``."""
    _check_int(dim, name)
    if dim > width:
        raise ValueError(f"{name}={dim} is larger than the embedding width {width}")
    return dim


def _check_k(k, num_database: int, name: str = "k") -> int:
    """A neighbour count in ``[1, N]``."""
    _check_int(k, name)
    if k > num_database:
        raise ValueError(f"{name}={k} is larger than the database ({num_database} rows)")
    return k


def _check_kind(kind) -> str:
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    return kind


def _check_index_options(options: dict) -> dict:
    """Known index options (:data:`INDEX_OPTIONS`) with valid values."""
    for key in options:
        if key not in INDEX_OPTIONS:
            raise ValueError(f"unknown index option {key!r}; expected some of {INDEX_OPTIONS}")
    if "hnsw_m" in options:
        _check_int(options["hnsw_m"], "hnsw_m (HNSW M)", low=2)
    if "ef_search" in options:
        _check_int(options["ef_search"], "ef_search (HNSW efSearch)")
    if "ef_construction" in options:
        _check_int(options["ef_construction"], "ef_construction (HNSW efConstruction)")
    return options


def _stages_text(stages: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{d}:{n}" for d, n in stages)


def _check_stages(stages, width: int | None = None, num_database: int | None = None,
                  monotone: bool = True) -> list[tuple[int, int]]:
    """Funnel stages ``[(dim, keep), ...]`` of positive ints: dims non-decreasing, keeps non-increasing.

    With ``width`` / ``num_database`` also checks each dim against the width and the first keep
    against the database size; ``monotone=False`` skips the order checks. ValueError naming the stage.
    """
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(f"funnel stages must be a non-empty list of (dim, keep), got {stages!r}")
    out: list[tuple[int, int]] = []
    for i, stage in enumerate(stages):
        if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or len(stage) != 2:
            raise ValueError(f"funnel stage {i} must be a (dim, keep) pair, got {stage!r}")
        dim, keep = stage
        where = f"funnel stage {i} ({stage[0]!r}:{stage[1]!r}) of {list(stages)}"
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{where}: dim must be an integer >= 1, got {dim!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"{where}: keep must be an integer >= 1, got {keep!r}")
        if width is not None and dim > width:
            raise ValueError(f"{where}: dim {dim} is larger than the embedding width {width}")
        if i == 0 and num_database is not None and keep > num_database:
            raise ValueError(f"{where}: keep {keep} is larger than the database ({num_database} rows)")
        if monotone and out and dim < out[-1][0]:
            raise ValueError(f"{where}: dims must be non-decreasing, {dim} follows {out[-1][0]}")
        if monotone and out and keep > out[-1][1]:
            raise ValueError(f"{where}: shortlist sizes must be non-increasing, {keep} follows {out[-1][1]}")
        out.append((dim, keep))
    return out


# ----------------------------------------------------------------------------- exact search
def normalize_prefix(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N, d] -> float32 [N, dim]``: the first ``dim`` columns, each row L2-normalised (zero rows stay 0)."""
    _check_matrix(embeddings, "embeddings")
    _check_dim(dim, embeddings.shape[1])
    return F.normalize(embeddings[:, :dim].float(), dim=1).contiguous()


def _sort_desc_stable(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value (descending), equal values by index (ascending)."""
    order = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), indices.gather(1, order)


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row, best first, ties by the lower column; columns int64."""
    n = scores.shape[1]
    if k >= n:
        return scores.sort(dim=1, descending=True, stable=True)
    values, indices = scores.topk(k, dim=1)
    values, indices = _sort_desc_stable(values, indices)
    # topk may drop a lower column tied with the k-th value: redo those rows with a stable sort.
    kth = values[:, -1:]
    ties_left = (scores == kth).sum(1) > (values == kth).sum(1)
    if bool(ties_left.any()):
        rows = ties_left.nonzero().squeeze(1)
        v, i = scores[rows].sort(dim=1, descending=True, stable=True)
        values[rows], indices[rows] = v[:, :k], i[:, :k]
    return values, indices


def exact_search(
    queries: torch.Tensor, database: torch.Tensor, k: int, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-``k``: ``(scores [Q, k] float32, indices [Q, k] int64)``, best first.

    Vectors are used as given (normalise them first). Ties go to the lower database index. Queries
    and database are both cut into chunks of ``chunk_size`` rows (converted to float32 chunk by chunk)
    and the per-chunk top-``k`` are merged, so memory stays ``O(chunk_size**2 + Q * k)``. Runs on
    the tensors' device.
    """
    num_database, _ = _check_pair(database, queries)
    _check_k(k, num_database)
    _check_int(chunk_size, "chunk_size")
    out_scores, out_indices = [], []
    for q0 in range(0, queries.shape[0], chunk_size):
        q = queries[q0:q0 + chunk_size].float()
        best_v = q.new_empty((q.shape[0], 0))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for d0 in range(0, num_database, chunk_size):
            scores = q @ database[d0:d0 + chunk_size].float().T
            v, i = _topk_stable(scores, min(k, scores.shape[1]))
            # Earlier chunks hold lower indices and both parts are sorted with ties by index, so a
            # stable sort of [best, new] by value keeps the lower index first among equal scores.
            v = torch.cat([best_v, v], dim=1)
            i = torch.cat([best_i, i + d0], dim=1)
            order = v.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_v, best_i = v.gather(1, order), i.gather(1, order)
        out_scores.append(best_v)
        out_indices.append(best_i)
    return torch.cat(out_scores), torch.cat(out_indices)


def leave_one_out_search(embeddings: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """Each row's ``k`` nearest *other* rows of the same set, best first: ``indices [N, k]`` (inner product;
    normalise first). The deep-metric-learning protocol's search: every image of the evaluation set is a
    query against all the others (Recall@K on classes unseen in training). A row is never its own neighbour,
    even beside exact duplicates of itself."""
    _check_matrix(embeddings, "embeddings")
    n = embeddings.shape[0]
    _check_int(k, "k")
    if k >= n:
        raise ValueError(f"k={k} leaves no room: a leave-one-out search of {n} rows has at most {n - 1} neighbours")
    _, idx = exact_search(embeddings, embeddings, k + 1, chunk_size)
    own = idx == torch.arange(n, device=idx.device).unsqueeze(1)
    own[:, -1] |= ~own.any(1)  # more than k duplicates outrank the row itself: drop the last instead
    order = own.to(torch.int8).argsort(dim=1, stable=True)[:, :k]  # the others first, in rank order
    return idx.gather(1, order)


# ----------------------------------------------------------------------------- indexes
class SearchIndex:
    """A searchable set of (already normalised) vectors; made by :func:`build_index`.

    Attributes: ``kind`` (one of :data:`INDEX_KINDS`), ``dim``, ``ntotal`` (rows) and
    ``bytes_per_vector``: the storage of one vector (4*dim for exact / flat / hnsw, 2*dim for fp16,
    dim for sq8). For hnsw it counts the vectors only, not the graph links (about 2*M neighbour ids
    of 4 bytes each on the base level, more on upper levels).
    """

    def __init__(self, kind: str, dim: int, ntotal: int, bytes_per_vector: float, *,
                 vectors: torch.Tensor | None = None, faiss_index=None, ef_search: int | None = None):
        self.kind = kind
        self.dim = dim
        self.ntotal = ntotal
        self.bytes_per_vector = float(bytes_per_vector)
        self._vectors = vectors
        self._faiss_index = faiss_index
        self.ef_search = ef_search

    def __repr__(self) -> str:
        return f"SearchIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal})"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [Q, k] float32, indices [Q, k] int64)`` of already normalised ``queries [Q, dim]``, best first."""
        _check_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have width {queries.shape[1]} but the index holds {self.dim}-d vectors")
        _check_k(k, self.ntotal)
        if self._vectors is not None:
            return exact_search(queries.to(self._vectors.device), self._vectors, k)
        if self.kind == "hnsw":
            self._faiss_index.hnsw.efSearch = max(self.ef_search, k)  # fewer than k would miss results
        x = queries.detach().float().cpu().contiguous().numpy()
        scores, indices = self._faiss_index.search(x, k)
        return (torch.from_numpy(scores).to(queries.device),
                torch.from_numpy(indices).long().to(queries.device))


def build_index(
    database: torch.Tensor, kind: str = "exact", hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200
) -> SearchIndex:
    """An index over ``database [N, d]`` (already normalised prefix vectors), inner-product metric.

    Kinds: ``exact`` (torch, :func:`exact_search`), ``flat`` (faiss ``IndexFlatIP``), ``hnsw``
    (faiss ``IndexHNSWFlat(d, hnsw_m, METRIC_INNER_PRODUCT)``), ``fp16`` / ``sq8`` (faiss
    ``IndexScalarQuantizer`` ``QT_fp16`` / ``QT_8bit``, inner product; sq8 is trained on the database).
    """
    _check_matrix(database, "database")
    _check_kind(kind)
    _check_index_options({"hnsw_m": hnsw_m, "ef_search": ef_search, "ef_construction": ef_construction})
    n, d = database.shape
    if kind == "exact":
        return SearchIndex(kind, d, n, 4 * d, vectors=database.float().contiguous())
    faiss = _import_faiss()
    x = database.detach().float().cpu().contiguous().numpy()
    if kind == "flat":
        index, nbytes = faiss.IndexFlatIP(d), 4 * d
    elif kind == "hnsw":
        index, nbytes = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT), 4 * d
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        qtype, nbytes = (faiss.ScalarQuantizer.QT_fp16, 2 * d) if kind == "fp16" else (faiss.ScalarQuantizer.QT_8bit, d)
        index = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return SearchIndex(kind, d, n, nbytes, faiss_index=index, ef_search=ef_search)


# ----------------------------------------------------------------------------- searches
def search(database: torch.Tensor, queries: torch.Tensor, dim: int, k: int, index: str | SearchIndex = "exact",
           **index_options) -> torch.Tensor:
    """Indices ``[Q, k]`` of the ``k`` nearest database rows at prefix ``dim`` (normalised prefixes), best first.

    ``index``: a kind (:data:`INDEX_KINDS`; the index is built here) or a :class:`SearchIndex` already
    built over this database's ``dim``-prefixes (reused, e.g. by several cascades starting at ``dim``)."""
    num_database, width = _check_pair(database, queries)
    _check_dim(dim, width)
    _check_k(k, num_database)
    if isinstance(index, SearchIndex):
        if (index.dim, index.ntotal) != (dim, num_database):
            raise ValueError(f"the index holds {index.ntotal} vectors of {index.dim} dims, not the database's "
                             f"{num_database} at {dim}")
        built = index
    else:
        _check_kind(index)
        _check_index_options(index_options)
        built = build_index(normalize_prefix(database, dim), index, **index_options)
    return built.search(normalize_prefix(queries, dim), k)[1]


def rerank(database: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor, dim: int, k: int,
           chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Exact re-ranking of ``candidates [Q, c]`` (database indices) at prefix ``dim``; the best ``k`` ``[Q, k]``.

    Ties go to the lower database index. Queries are processed in chunks of about ``chunk_elements``
    gathered numbers (``rows * c * dim``).
    """
    num_database, width = _check_pair(database, queries)
    _check_dim(dim, width)
    if not isinstance(candidates, torch.Tensor) or candidates.ndim != 2 or candidates.shape[0] != queries.shape[0]:
        shape = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
        raise ValueError(f"candidates must be [Q={queries.shape[0]}, c] database indices, got {shape}")
    c = candidates.shape[1]
    _check_int(k, "k")
    if k > c:
        raise ValueError(f"k={k} is larger than the number of candidates per query ({c})")
    candidates = candidates.to(device=database.device, dtype=torch.long)
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= num_database):
        raise ValueError(f"candidate indices must lie in [0, {num_database}), got "
                         f"[{int(candidates.min())}, {int(candidates.max())}]")
    rows = max(1, chunk_elements // max(1, c * dim))
    out = []
    for q0 in range(0, queries.shape[0], rows):
        cand = candidates[q0:q0 + rows]
        q = F.normalize(queries[q0:q0 + rows, :dim].float(), dim=1)
        db = F.normalize(database[cand.reshape(-1), :dim].float(), dim=1).view(cand.shape[0], c, dim)
        scores = torch.bmm(db, q.unsqueeze(2)).squeeze(2)
        out.append(_sort_desc_stable(scores, cand)[1][:, :k])
    return torch.cat(out)


def adaptive_search(database: torch.Tensor, queries: torch.Tensor, shortlist_dim: int, shortlist: int,
                    rerank_dim: int, k: int, index: str | SearchIndex = "exact", **index_options) -> torch.Tensor:
    """Shortlist ``shortlist`` rows at ``shortlist_dim`` dims (from ``index``, as :func:`search` takes it),
    re-rank exactly at ``rerank_dim``.

    Returns ``[Q, k]`` database indices, best first.
    """
    num_database, width = _check_pair(database, queries)
    _check_dim(shortlist_dim, width, "shortlist_dim")
    _check_dim(rerank_dim, width, "rerank_dim")
    _check_k(shortlist, num_database, "shortlist")
    _check_int(k, "k")
    if k > shortlist:
        raise ValueError(f"k={k} is larger than the shortlist ({shortlist})")
    candidates = search(database, queries, shortlist_dim, shortlist, index, **index_options)
    return rerank(database, queries, candidates, rerank_dim, k)


def funnel_search(database: torch.Tensor, queries: torch.Tensor, stages: Sequence[tuple[int, int]],
                  k: int | None = None, index: str | SearchIndex = "exact", **index_options) -> torch.Tensor:
    """Funnel retrieval over ``stages [(dim, keep), ...]``; ``[Q, k]`` (``k`` defaults to the last keep).

    Stage 1 searches the database (through ``index``) at its dim for its keep; each later stage
    re-ranks the previous stage's candidates exactly at its dim and keeps its count.
    """
    num_database, width = _check_pair(database, queries)
    stages = _check_stages(stages, width, num_database)
    last_keep = stages[-1][1]
    k = last_keep if k is None else _check_int(k, "k")
    if k > last_keep:
        raise ValueError(f"k={k} is larger than the last funnel stage's keep ({last_keep})")
    dim, keep = stages[0]
    candidates = search(database, queries, dim, keep, index, **index_options)
    for dim, keep in stages[1:]:
        candidates = rerank(database, queries, candidates, dim, keep)
    return candidates[:, :k]


def search_cost(num_database: int, stages: Sequence[tuple[int, int]]) -> int:
    """Multiply-adds per query: ``N * d1 + sum_{i>=2} keep_{i-1} * d_i`` (a single stage ``[(D, k)]`` is ``N * D``).

    Stage order is not checked here, so an adaptive search with ``rerank_dim < shortlist_dim`` has a cost too.
    """
    _check_int(num_database, "num_database")
    stages = _check_stages(stages, monotone=False)
    cost = num_database * stages[0][0]
    for (_, previous_keep), (dim, _) in zip(stages[:-1], stages[1:]):
        cost += previous_keep * dim
    return cost


# ----------------------------------------------------------------------------- metrics
def metric_columns(k: int) -> list[str]:
    """Column names of a per-dim result row, in order."""
    return ["dim", "nn1_top1", "knn_top1", f"map_at_{k}_ref", f"map_at_{k}", f"precision_at_{k}",
            f"recall_at_{k}", f"hit_at_{k}"]


def _label_vector(labels, name: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    return labels


def knn_vote(neighbor_labels: torch.Tensor, similarities: torch.Tensor | None = None,
             temperature: float | None = None, chunk_rows: int = 4096) -> torch.Tensor:
    """The label each row of ranked neighbour labels ``[Q, k]`` votes for: ``[Q]``.

    Without ``temperature`` a majority vote; with it each neighbour weighs
    ``exp(similarity / temperature)`` (DINO's weighted kNN; needs ``similarities [Q, k]``). A tie goes
    to the tied label met first in rank order (the nearer neighbour).
    """
    if temperature is not None:
        if similarities is None:
            raise ValueError("a weighted vote (temperature) needs the neighbours' similarities")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
    out = []
    for r0 in range(0, neighbor_labels.shape[0], chunk_rows):
        lab = neighbor_labels[r0:r0 + chunk_rows]
        same = lab.unsqueeze(2) == lab.unsqueeze(1)  # [q, k, k]: rank j shares the label of rank i
        if temperature is None:
            votes = same.sum(2)  # integer counts: exact
        else:
            weights = (similarities[r0:r0 + chunk_rows].float() / temperature).exp()
            votes = (same * weights.unsqueeze(1)).sum(2)
        first = votes.argmax(1)  # argmax returns the first maximal position: the nearest of tied labels
        out.append(lab.gather(1, first.unsqueeze(1)).squeeze(1))
    return torch.cat(out) if out else neighbor_labels.new_empty(0)


def retrieval_metrics(neighbor_labels: torch.Tensor, query_labels: torch.Tensor, database_labels: torch.Tensor,
                      k: int) -> dict[str, float]:
    """Ranking metrics at ``k`` in percent (see the module docstring); keys as :func:`metric_columns` without ``dim``.

    ``neighbor_labels [Q, >=k]``: labels of each query's ranked neighbours; ``database_labels [N]``
    gives ``R`` (database items with the query's label). A query with ``R = 0`` scores AP 0 and recall 0.
    """
    neighbor_labels = torch.as_tensor(neighbor_labels)
    query_labels = _label_vector(query_labels, "query_labels")
    database_labels = _label_vector(database_labels, "database_labels")
    _check_int(k, "k")
    if neighbor_labels.ndim != 2:
        raise ValueError(f"neighbor_labels must be [Q, k], got shape {tuple(neighbor_labels.shape)}")
    if neighbor_labels.shape[1] < k:
        raise ValueError(f"k={k} is larger than the {neighbor_labels.shape[1]} neighbours given per query")
    if neighbor_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(f"neighbor_labels has {neighbor_labels.shape[0]} rows but query_labels has "
                         f"{query_labels.shape[0]} labels")
    if query_labels.shape[0] == 0:
        raise ValueError("no queries: query_labels is empty")
    device = neighbor_labels.device
    query_labels, database_labels = query_labels.to(device), database_labels.to(device)
    top = neighbor_labels[:, :k]
    rel = (top == query_labels.unsqueeze(1)).double()  # [Q, k]; float64: percentages without float32 noise
    hits = rel.sum(1)
    # R: number of database items carrying each query's label (0 when absent).
    classes, counts = torch.unique(database_labels, return_counts=True)
    if classes.numel():
        pos = torch.searchsorted(classes, query_labels.to(classes.dtype)).clamp(max=classes.numel() - 1)
        num_relevant = torch.where(classes[pos] == query_labels, counts[pos], 0).double()
    else:
        num_relevant = torch.zeros_like(hits)
    ranks = torch.arange(1, k + 1, device=device, dtype=torch.float64)
    ap_sum = (rel.cumsum(1) / ranks * rel).sum(1)  # sum of precision@j over relevant ranks j <= k
    ap_ref = ap_sum / k
    denom = num_relevant.clamp(max=k)
    ap = torch.where(denom > 0, ap_sum / denom.clamp(min=1), torch.zeros_like(ap_sum))
    recall = torch.where(num_relevant > 0, hits / num_relevant.clamp(min=1), torch.zeros_like(hits))
    knn = knn_vote(top)

    def pct(x: torch.Tensor) -> float:
        return 100.0 * float(x.double().mean())

    return {
        "nn1_top1": pct(top[:, 0] == query_labels),
        "knn_top1": pct(knn == query_labels),
        f"map_at_{k}_ref": pct(ap_ref),
        f"map_at_{k}": pct(ap),
        f"precision_at_{k}": pct(hits / k),
        f"recall_at_{k}": pct(recall),
        f"hit_at_{k}": pct(hits > 0),
    }


# ----------------------------------------------------------------------------- parsing
def parse_adaptive(text: str) -> tuple[int, int, int]:
    """``"16:200:512"`` -> ``(shortlist_dim, shortlist, rerank_dim)`` = ``(16, 200, 512)``."""
    parts = str(text).strip().split(":")
    try:
        values = tuple(int(p.strip()) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"adaptive spec {text!r} must be SHORTLIST_DIM:SHORTLIST:RERANK_DIM with positive "
                         f"integers, e.g. 16:200:512")
    return values  # type: ignore[return-value]


def parse_funnel(text: str) -> list[tuple[int, int]]:
    """``"16:800,32:400,64:200,128:50,512:10"`` -> ``[(16, 800), (32, 400), ...]`` (checked as funnel stages)."""
    stages = []
    for part in str(text).strip().split(","):
        pieces = part.strip().split(":")
        try:
            dim, keep = (int(p.strip()) for p in pieces)
        except ValueError:
            raise ValueError(f"funnel spec {text!r} must be DIM:KEEP,DIM:KEEP,... with positive integers, "
                             f"e.g. 16:800,32:400,64:200,128:50,512:10 (bad part {part!r})") from None
        if dim < 1 or keep < 1:
            raise ValueError(f"funnel spec {text!r}: dims and keeps must be >= 1 (bad part {part!r})")
        stages.append((dim, keep))
    try:
        return _check_stages(stages)
    except ValueError as err:
        raise ValueError(f"funnel spec {text!r}: {err}") from None


# ----------------------------------------------------------------------------- evaluation
def evaluate_retrieval(
    database: torch.Tensor,
    database_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    dims: Sequence[int] | None = None,
    k: int = 10,
    index: str = "exact",
    adaptive: Sequence[tuple[int, int, int]] = (),
    funnel: Sequence[Sequence[tuple[int, int]]] = (),
    **index_options,
) -> tuple[list[dict], list[dict]]:
    """Retrieval metrics per prefix size, and per adaptive / funnel cascade: ``(rows, cascade_rows)``.

    ``rows``: one per dim, ``{**metric_columns(k), "cost", "index"}`` with ``cost = N * dim``.
    ``cascade_rows``: one per adaptive spec ``(shortlist_dim, shortlist, rerank_dim)`` then one per
    funnel: ``{"method", "stages" ("16:200,512:10"), "dim" (final re-rank dim), metrics...,
    "cost", "cost_ratio" (N * width / cost), "index"}``. ``index`` is used for the fixed-size
    searches and the first stage of the cascades; re-ranking is always exact. ``dims`` defaults to
    :func:`mrl_vision.heads.default_dims` of the width. Every input is checked before any search.
    """
    num_database, width = _check_pair(database, queries)
    database_labels = _label_vector(database_labels, "database_labels")
    query_labels = _label_vector(query_labels, "query_labels")
    if database_labels.shape[0] != num_database:
        raise ValueError(f"database_labels has {database_labels.shape[0]} labels but the database has "
                         f"{num_database} rows")
    if query_labels.shape[0] != queries.shape[0]:
        raise ValueError(f"query_labels has {query_labels.shape[0]} labels but there are {queries.shape[0]} queries")
    dims = default_dims(width) if dims is None else validate_dims(dims, width)
    _check_k(k, num_database)
    _check_kind(index)
    _check_index_options(index_options)
    adaptive_specs = []
    for spec in adaptive:
        if isinstance(spec, str):
            spec = parse_adaptive(spec)
        if not isinstance(spec, Sequence) or len(spec) != 3:
            raise ValueError(f"adaptive spec must be (shortlist_dim, shortlist, rerank_dim), got {spec!r}")
        shortlist_dim, shortlist, rerank_dim = spec
        _check_dim(shortlist_dim, width, f"adaptive {spec!r}: shortlist_dim")
        _check_dim(rerank_dim, width, f"adaptive {spec!r}: rerank_dim")
        _check_k(shortlist, num_database, f"adaptive {spec!r}: shortlist")
        if shortlist < k:
            raise ValueError(f"adaptive {spec!r}: shortlist {shortlist} is smaller than k={k}")
        adaptive_specs.append((shortlist_dim, shortlist, rerank_dim))
    funnels = []
    for stages in funnel:
        if isinstance(stages, str):
            stages = parse_funnel(stages)
        stages = _check_stages(stages, width, num_database)
        if stages[-1][1] < k:
            raise ValueError(f"funnel {_stages_text(stages)}: the last keep {stages[-1][1]} is smaller than k={k}")
        funnels.append(stages)

    def metrics(indices: torch.Tensor) -> dict[str, float]:
        neighbor_labels = database_labels[indices.to(database_labels.device)]
        return retrieval_metrics(neighbor_labels, query_labels, database_labels, k)

    full_cost = search_cost(num_database, [(width, k)])
    cascades = [("adaptive", [(sd, sl), (rd, k)]) for sd, sl, rd in adaptive_specs]
    cascades += [("funnel", stages) for stages in funnels]
    # one index per dim: built once, shared by the fixed-size search and the cascades starting there
    starts = {stages[0][0] for _, stages in cascades}
    built: dict[int, SearchIndex] = {}

    def index_at(m: int) -> SearchIndex:
        if m in built:
            return built[m]
        new = build_index(normalize_prefix(database, m), index, **index_options)
        if m in starts:
            built[m] = new
        return new

    rows = []
    for m in dims:
        indices = search(database, queries, m, k, index_at(m))
        rows.append({"dim": m, **metrics(indices), "cost": search_cost(num_database, [(m, k)]), "index": index})

    cascade_rows = []
    for method, stages in cascades:
        if method == "adaptive":
            (sd, sl), (rd, _) = stages
            indices = adaptive_search(database, queries, sd, sl, rd, k, index_at(sd))
        else:
            indices = funnel_search(database, queries, stages, k, index_at(stages[0][0]))
        cost = search_cost(num_database, stages)
        cascade_rows.append({
            "method": method, "stages": _stages_text(stages), "dim": stages[-1][0], **metrics(indices),
            "cost": cost, "cost_ratio": full_cost / cost, "index": index,
        })
    return rows, cascade_rows


def __getattr__(name: str):
    """``load_embeddings`` and ``read_embeddings_info`` (the folders ``mrl-vision embed`` writes) are
    :mod:`mrl_vision.embeddings`'s, reachable from here; imported on first use."""
    if name in ("load_embeddings", "read_embeddings_info"):
        from . import embeddings

        return getattr(embeddings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
