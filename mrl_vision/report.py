"""Accuracy-vs-dimensions tables and plots (classification, the 2D Matryoshka blocks x dims grid, and
retrieval)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Mapping

from .files import atomic_path, atomic_write_text
from .heads import HEAD_LABELS
from .model import upgrade_config


RETRIEVAL_METRICS = ("recall", "knn_top1")
"""The metric families of an embedding's per-size retrieval (:class:`mrl_vision.metrics.MatryoshkaRetrieval`)."""


def accuracy_rows(metrics: Mapping[str, float], prefix: str = "", families: tuple[str, ...] = ("top",)) -> list[dict]:
    """Turn ``{"test/top1@8": 0.9, "test/top5@8": 0.99, ...}`` into rows sorted by size:
    ``[{"dims": 8, "top1": 90.0, "top5": 99.0}, ...]`` (percent). ``families``: the metric names' beginnings
    (:data:`RETRIEVAL_METRICS` for ``recall1@8``, ``knn_top1@8``, ...)."""
    rows: dict[int, dict] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if "@" not in name or not name.startswith(families):
            continue
        metric, size = name.split("@", 1)
        if not size.isdigit():
            continue
        rows.setdefault(int(size), {"dims": int(size)})[metric] = 100.0 * float(value)
    return [rows[m] for m in sorted(rows)]


def format_table(rows: list[dict], title: str = "") -> str:
    """A fixed-width text table of accuracy per size (what the CLI prints after ``test``)."""
    if not rows:
        return f"{title}\n(no per-size metrics)\n"
    cols = [c for c in rows[0] if c != "dims"]
    lines = [title] if title else []
    widths = [max(10, len(c) + 3) for c in cols]
    lines.append("  dims " + "".join(f"{c + ' %':>{w}}" for c, w in zip(cols, widths)))
    for r in rows:
        lines.append(f"{r['dims']:>6} " + "".join(f"{r.get(c, float('nan')):>{w}.2f}" for c, w in zip(cols, widths)))
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["dims"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def draw_accuracy(ax, curves: Mapping[str, list[dict]], metric: str = "top1", title: str = "") -> None:
    """Accuracy vs dimensions on ``ax`` (matplotlib), log-2 x axis, one line per named curve."""
    sizes: set[int] = set()
    for name, rows in curves.items():
        xs = [r["dims"] for r in rows if metric in r]
        ys = [r[metric] for r in rows if metric in r]
        sizes |= set(xs)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sorted(sizes))
        ax.set_xticklabels([str(s) for s in sorted(sizes)], rotation=45)
    ax.set_xlabel("embedding dimensions")
    ax.set_ylabel(f"{metric} (%)" if metric.startswith(RETRIEVAL_METRICS) else f"{metric} accuracy (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize=8)


def _save(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _figure(panels: int = 1):
    """``(fig, ax)`` of one panel, or ``(fig, axes)`` of ``panels`` side by side (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(6.4 if panels == 1 else 5 * panels, 4.2), dpi=120)


def plot_accuracy(curves: Mapping[str, list[dict]], path: str | os.PathLike, metric: str = "top1", title: str = "") -> None:
    """:func:`draw_accuracy` saved as a PNG (crash-safe)."""
    fig, ax = _figure()
    draw_accuracy(ax, curves, metric, title)
    _save(fig, path)


def write_accuracy_report(rows: list[dict], out_dir: str | os.PathLike, stem: str = "test_accuracy", title: str = "",
                          metric: str = "top1") -> tuple[Path, Path]:
    """Write ``{stem}.csv`` and ``{stem}.png`` (``metric`` against dims) into ``out_dir`` (both crash-safe);
    return their paths."""
    out = Path(out_dir)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    atomic_write_text(csv_path, rows_to_csv(rows))
    plot_accuracy({title or stem: rows}, png_path, metric=metric, title=title)
    return csv_path, png_path


# ----------------------------------------------------------------------------- 2D Matryoshka grid
def _grid_cell(cell: str) -> tuple[int, int] | None:
    """``(k, m)`` of a cell spelled ``L{k}/{m}`` (:func:`mrl_vision.matryoshka2d.grid_key`), else None."""
    layers, _, dims = cell[1:].partition("/")
    if cell.startswith("L") and layers.isdigit() and dims.isdigit():
        return int(layers), int(dims)
    return None


def _metric_order(name: str) -> tuple[int, str]:
    """``top1`` before ``top5`` before ``top10``."""
    return (int(name[3:]), name) if name[3:].isdigit() else (1 << 30, name)


def grid_rows(metrics: Mapping[str, float], prefix: str, depth: int) -> list[dict]:
    """Turn the (block, size) grid of a 2D Matryoshka evaluation into rows sorted by (layers, dims):
    ``{"test/top1@L6/64": 0.7, ...}`` -> ``[{"layers": 6, "dims": 64, "top1": 70.0, "top5": ...}, ...]``
    (percent). The full-depth row (``layers == depth``) comes from the 1D keys ``{prefix}top1@{m}``.
    Returns ``[]`` when ``metrics`` has no grid key (a run without ``eval_layers``).

    Example::

        grid_rows({"val/top1@L1/8": 0.5, "val/top1@8": 0.75}, "val/", depth=2)
        # [{"layers": 1, "dims": 8, "top1": 50.0}, {"layers": 2, "dims": 8, "top1": 75.0}]
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (the model's number of blocks), got {depth!r}")
    cells: dict[tuple[int, int], dict] = {}
    full: dict[tuple[int, int], dict] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        metric, at, cell = key[len(prefix):].partition("@")
        if not at or not metric.startswith("top"):
            continue
        if cell.isdigit():
            target, where = full, (depth, int(cell))
        elif (where := _grid_cell(cell)) is not None:
            if where[0] >= depth:
                raise ValueError(f"{key!r} names block {where[0]}, but the model's depth is {depth}: grid keys are "
                                 f"the earlier blocks (the full depth is logged as {prefix}{metric}@m)")
            target = cells
        else:
            continue
        target.setdefault(where, {"layers": where[0], "dims": where[1]})[metric] = 100.0 * float(value)
    if not cells:
        return []
    cells.update(full)
    return [cells[c] for c in sorted(cells)]


def grid_to_csv(rows: list[dict]) -> str:
    """CSV text of grid rows: ``layers, dims, top1[, top5]`` (after a ``run`` column when rows name their run)."""
    keys = {k for r in rows for k in r}
    metrics = sorted(keys - {"run", "layers", "dims"}, key=_metric_order)
    fields = ["run"] * ("run" in keys) + ["layers", "dims", *metrics]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_grid(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``{stage}_grid.csv`` (:func:`write_grid_report`): ``[{"layers", "dims", "top1", ...}]``."""
    rows = []
    for r in _read_csv_rows(Path(path)):
        rows.append({k: (int(v) if k in ("layers", "dims") else float(v)) for k, v in r.items() if v not in ("", None)})
    missing = [c for c in ("layers", "dims") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{str(path)!r} is not a grid table: no {missing[0]!r} column")
    return rows


def grid_table(rows: list[dict], metric: str = "top1") -> list[dict]:
    """The grid as a wide table: one row per block count, one column per size (``None`` where no cell),
    ``[{"layers": 6, "8": 61.2, "16": 66.0, ...}, ...]``."""
    sizes = sorted({r["dims"] for r in rows})
    table: dict[int, dict] = {}
    for r in rows:
        table.setdefault(r["layers"], {"layers": r["layers"], **{str(m): None for m in sizes}})[str(r["dims"])] = r.get(metric)
    return [table[k] for k in sorted(table)]


def format_grid(rows: list[dict], title: str = "", metric: str = "top1") -> str:
    """A fixed-width text table of the grid (rows = blocks, columns = sizes; what the callback prints)."""
    if not rows:
        return f"{title}\n(no grid metrics)\n"
    table = grid_table(rows, metric)
    sizes = [c for c in table[0] if c != "layers"]
    lines = [title] if title else []
    lines.append("blocks \\ dims".rjust(13) + "".join(f"{m:>8}" for m in sizes))
    for r in table:
        lines.append(f"{r['layers']:>13}" + "".join("       -" if r[m] is None else f"{r[m]:>8.2f}" for m in sizes))
    return "\n".join(lines) + "\n"


def draw_grid(ax, rows: list[dict], metric: str = "top1", title: str = ""):
    """A heatmap of ``metric`` over (blocks, sizes) on ``ax``: blocks on the y axis (the full depth at the
    top), sizes on the x axis, each cell annotated with its value. Returns the image (for a colour bar)."""
    import numpy as np

    table = grid_table(rows, metric)
    sizes = [c for c in table[0] if c != "layers"] if table else []
    values = np.array([[np.nan if r[m] is None else r[m] for m in sizes] for r in table], dtype=float).reshape(len(table), len(sizes))
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect="auto", cmap="viridis")
    lo, hi = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):  # dark text on the bright (high) end of viridis
                colour = "black" if values[i, j] > (lo + hi) / 2 else "white"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels(sizes, rotation=45)
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels([str(r["layers"]) for r in table])
    ax.set_xlabel("embedding dimensions")
    ax.set_ylabel("transformer blocks")
    if title:
        ax.set_title(title, fontsize=9)
    return image


def plot_grid(panels: Mapping[str, list[dict]], path: str | os.PathLike, metric: str = "top1") -> None:
    """One :func:`draw_grid` heatmap with its colour bar per named grid, side by side, saved as a PNG (crash-safe)."""
    fig, axes = _figure(len(panels))
    axes = [axes] if len(panels) == 1 else list(axes)
    n_layers = max((len({r["layers"] for r in rows}) for rows in panels.values()), default=1)
    n_sizes = max((len({r["dims"] for r in rows}) for rows in panels.values()), default=1)
    fig.set_size_inches(len(panels) * max(5.0, 1.6 + 0.6 * n_sizes), max(3.6, 1.6 + 0.35 * n_layers))
    for ax, (name, rows) in zip(axes, panels.items()):
        image = draw_grid(ax, rows, metric, title=name)
        fig.colorbar(image, ax=ax, label=f"{metric} accuracy (%)")
    _save(fig, path)


def write_grid_report(rows: list[dict], out_dir: str | os.PathLike, stem: str = "test_grid", title: str = "") -> tuple[Path, Path]:
    """Write ``{stem}.csv`` (``layers, dims, top1[, top5]``, percent) and ``{stem}.png`` (the top-1
    heatmap) into ``out_dir``, both crash-safe; return their paths."""
    if not rows:
        raise ValueError("no grid rows to write (a run evaluated at one depth has no grid)")
    out = Path(out_dir)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    atomic_write_text(csv_path, grid_to_csv(rows))
    plot_grid({title or f"top-1 accuracy (%) by blocks and dims ({stem})": rows}, png_path)
    return csv_path, png_path


# ----------------------------------------------------------------------------- runs -> report
def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_hparams(run_dir: Path) -> dict:
    path = run_dir / "hparams.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def run_label(hparams: Mapping) -> str:
    """``MRL``, ``MRL-E``, ``FF`` or ``FF-proj`` from a run's model hyperparameters (any version's spelling)."""
    head = upgrade_config(dict(hparams)).get("head", "mrl")
    return HEAD_LABELS.get(head, str(head))


def last_logged(metrics_csv: Path, prefix: str) -> dict[str, float]:
    """The newest value of every ``{prefix}top*@m`` column in a CSV logger's ``metrics.csv``."""
    found: dict[str, float] = {}
    for row in _read_csv_rows(metrics_csv):
        for k, v in row.items():
            if k and k.startswith(prefix + "top") and "@" in k and v not in ("", None):
                found[k] = float(v)
    return found


def read_run_results(run_dir: str | os.PathLike) -> dict:
    """One run folder (a CSV logger version folder, or a ``mrl-vision truncate`` output) as a dict:
    ``{"dir", "label", "split", "rows": [{"dims", "top1", "top5"?}], "adaptive": {...} | None, "hparams"}``,
    plus ``"grid"`` and ``"grid_split"`` for a 2D Matryoshka run.

    Accuracies (percent) come from ``test_accuracy.csv`` when the run was tested, else the last
    ``test/`` then ``val/`` values in ``metrics.csv``. A truncation folder gives ``rows`` per probe in
    ``"series"`` instead. The adaptive cascade (``adaptive_{test,val}_curve.csv`` and the logged
    ``adaptive/*`` values) is included when present, and so is the (block, size) grid of a 2D Matryoshka
    run (``"grid": [{"layers", "dims", "top1", "top5"?}]`` from ``test_grid.csv``, else ``val_grid.csv``;
    ``"grid_split"`` says which).
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {str(d)!r} does not exist")
    if (d / "truncation.csv").is_file():
        rows = _read_csv_rows(d / "truncation.csv")
        meta = json.loads((d / "truncation.json").read_text()) if (d / "truncation.json").is_file() else {}
        # a fixed-feature head at the full width is the standard model
        base = "standard" if meta.get("head", "ff") == "ff" else HEAD_LABELS.get(meta["head"], meta["head"])
        series = {
            f"{base}, first m dims + linear probe": [{"dims": int(r["dims"]), "top1": float(r["prefix_top1"])} for r in rows],
            f"{base}, SVD to m dims + linear probe": [{"dims": int(r["dims"]), "top1": float(r["svd_top1"])} for r in rows],
        }
        return {"dir": str(d), "label": "truncated", "split": "test", "rows": [], "series": series,
                "adaptive": None, "hparams": {}}
    hparams = _read_hparams(d)
    metrics_csv = d / "metrics.csv"
    split, rows = None, []
    if (d / "test_accuracy.csv").is_file():
        split = "test"
        rows = [{k: (int(v) if k == "dims" else float(v)) for k, v in r.items() if v != ""}
                for r in _read_csv_rows(d / "test_accuracy.csv")]
    elif metrics_csv.is_file():
        for stage in ("test", "val"):
            rows = accuracy_rows(last_logged(metrics_csv, f"{stage}/"), f"{stage}/")
            if rows:
                split = stage
                break
    if not rows:
        raise ValueError(f"no per-size accuracies in {str(d)!r}: expected test_accuracy.csv or "
                         "test/top1@m or val/top1@m columns in metrics.csv (a CSV logger folder)")
    adaptive = None
    for stage in ("test", "val"):
        curve_path = d / f"adaptive_{stage}_curve.csv"
        if curve_path.is_file():
            curve = [{"kind": r["kind"], "expected_dims": float(r["expected_dims"]), "top1": float(r["top1"])}
                     for r in _read_csv_rows(curve_path)]
            chosen = {}
            if metrics_csv.is_file():
                for row in _read_csv_rows(metrics_csv):
                    if row.get("adaptive/top1"):
                        chosen = {"top1": 100 * float(row["adaptive/top1"]),
                                  "expected_dims": float(row["adaptive/expected_dims"])}
            adaptive = {"split": stage, "curve": curve, "chosen": chosen or None}
            break
    result = {"dir": str(d), "label": run_label(hparams), "split": split, "rows": rows, "adaptive": adaptive,
              "hparams": hparams}
    for stage in ("test", "val"):
        if (d / f"{stage}_grid.csv").is_file():
            result.update(grid=read_grid(d / f"{stage}_grid.csv"), grid_split=stage)
            break
    return result


def run_names(runs: list[dict]) -> list[str]:
    """A distinct short name per run: the fewest trailing parts of its folder path that tell it
    from every other (``version_0`` alone, or ``mrl/version_0`` beside ``ff/version_0``)."""
    parts = [Path(r["dir"]).resolve().parts for r in runs]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{'/'.join(p)} #{i + 1}" for i, p in enumerate(parts)]  # the same folder given twice


def collect_series(runs: list[dict], metric: str = "top1") -> dict[str, list[dict]]:
    """Curves to plot and tabulate, ``{name: [{"dims", metric}, ...]}``: one per MRL/MRL-E run (named
    by its label, or label + folder when two share one), the FF runs merged into one curve (a point
    per trained size; one curve per run when two trained the same size), and the truncation probes.
    No run is ever dropped."""
    series: dict[str, list[dict]] = {}
    labels = [r["label"] for r in runs]
    names = run_names(runs)
    # FF runs merge into one curve of a point per size, unless two of them trained the same size
    sizes = [(r["label"], row["dims"]) for r in runs if "series" not in r for row in r["rows"]]
    clashing = {label for label, m in sizes if sizes.count((label, m)) > 1}
    for run, folder in zip(runs, names):
        if "series" in run:
            for name, rows in run["series"].items():
                series[name if name not in series else f"{name} ({folder})"] = rows
            continue
        if run["label"] in ("FF", "FF-proj") and run["label"] not in clashing:
            series.setdefault(run["label"], []).extend(run["rows"])
            continue
        name = run["label"] if labels.count(run["label"]) == 1 else f"{run['label']} ({folder})"
        series[name] = list(run["rows"])
    for name, rows in series.items():
        by_size = {}
        for r in rows:
            if metric in r:
                by_size[r["dims"]] = {"dims": r["dims"], metric: r[metric]}
        series[name] = [by_size[m] for m in sorted(by_size)]
    return series


def comparison_rows(series: Mapping[str, list[dict]], metric: str = "top1") -> list[dict]:
    """A wide table: one row per size, one column per curve (empty where a curve has no point)."""
    sizes = sorted({r["dims"] for rows in series.values() for r in rows})
    table = []
    for m in sizes:
        row: dict = {"dims": m}
        for name, rows in series.items():
            row[name] = next((r[metric] for r in rows if r["dims"] == m), None)
        table.append(row)
    return table


def markdown_table(rows: list[dict], digits: int = 2) -> str:
    """A Markdown table of ``rows`` (floats with ``digits`` decimals, missing values as ``-``)."""
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_adaptive(ax, runs: list[dict]) -> bool:
    """Each run's cascades (accuracy vs expected dims) beside its fixed sizes, on ``ax``; the chosen
    cascade starred. False (nothing drawn) when no run has an adaptive curve."""
    with_curve = [(r, n) for r, n in zip(runs, run_names(runs)) if r.get("adaptive")]
    for i, (run, folder) in enumerate(with_curve):
        a, colour = run["adaptive"], f"C{i}"
        name = run["label"] if len(with_curve) == 1 else f"{run['label']} ({folder})"
        for kind, style in (("fixed", "s--"), ("cascade", "o-")):
            pts = [p for p in a["curve"] if p["kind"] == kind]
            ax.plot([p["expected_dims"] for p in pts], [p["top1"] for p in pts], style, color=colour, markersize=4,
                    label=f"{name}: {'fixed sizes' if kind == 'fixed' else 'cascades'}")
        if a["chosen"]:
            ax.plot([a["chosen"]["expected_dims"]], [a["chosen"]["top1"]], "*", color=colour, markersize=12,
                    label=f"{name}: chosen cascade")
    if not with_curve:
        return False
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expected embedding dimensions")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("adaptive classification")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return True


def plot_adaptive(runs: list[dict], path: str | os.PathLike) -> bool:
    """:func:`draw_adaptive` saved as a PNG; False (nothing written) when no run has a cascade."""
    if not any(r.get("adaptive") for r in runs):
        return False
    fig, ax = _figure()
    draw_adaptive(ax, runs)
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------- retrieval
def _cost_dims(row: Mapping, num_database: int) -> float:
    """A search's cost in dimensions: its multiply-adds per query over the database size (a full
    search at ``m`` dims costs ``m``; a cascade, its equivalent)."""
    return float(row["cost"]) / num_database


def draw_retrieval(axes, rows: list[dict], cascades: list[dict], k: int, label: str = "") -> None:
    """1-NN top-1 (``axes[0]``) and mAP@k (``axes[1]``, the usual convention) against the search cost in
    dims (log-2 axis): the fixed sizes as a line, the adaptive and funnel cascades as points."""
    if not rows:
        return
    n = float(rows[0]["cost"]) / float(rows[0]["dim"])
    prefix = f"{label}: " if label else ""
    for ax, metric, name in ((axes[0], "nn1_top1", "1-NN top-1"), (axes[1], f"map_at_{k}", f"mAP@{k}")):
        line = ax.plot([r["dim"] for r in rows], [float(r[metric]) for r in rows], "o-", label=f"{prefix}fixed sizes")
        colour = line[0].get_color()
        for c in cascades:
            marker = "*" if c["method"] == "adaptive" else "D"
            ax.plot([_cost_dims(c, n)], [float(c[metric])], marker, color=colour, markersize=9 if marker == "*" else 6,
                    linestyle="none", label=f"{prefix}{c['method']} {c['stages']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("search cost (multiply-adds per query / database size = dims)")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)


def _retrieval_figure(title: str = ""):
    """A figure with the two panels of :func:`draw_retrieval`: ``(fig, axes)``."""
    fig, axes = _figure(2)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, axes


def plot_retrieval(rows: list[dict], cascades: list[dict], path: str | os.PathLike, k: int = 10, title: str = "") -> None:
    """:func:`draw_retrieval` saved as a PNG (crash-safe)."""
    fig, axes = _retrieval_figure(title)
    draw_retrieval(axes, rows, cascades, k)
    _save(fig, path)


def _numbers(row: Mapping[str, str]) -> dict:
    out: dict = {}
    for key, value in row.items():
        try:
            out[key] = int(value) if key == "dim" else float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def read_retrieval(folder: str | os.PathLike) -> dict:
    """A ``mrl-vision retrieve`` output folder: ``{"dir", "k", "rows", "cascades", "meta"}``."""
    d = Path(folder)
    meta = json.loads((d / "retrieval.json").read_text()) if (d / "retrieval.json").is_file() else {}
    rows = [_numbers(r) for r in _read_csv_rows(d / "retrieval.csv")]
    cascades = [_numbers(r) for r in _read_csv_rows(d / "retrieval_cascades.csv")] \
        if (d / "retrieval_cascades.csv").is_file() else []
    k = meta.get("k") or next((int(c[len("hit_at_"):]) for c in (rows[0] if rows else {}) if c.startswith("hit_at_")), 10)
    return {"dir": str(d), "k": int(k), "rows": rows, "cascades": cascades, "meta": meta}


def _write_retrieval_report(folders: list[Path], out: Path, title: str) -> dict[str, Path]:
    """The retrieval folders' per-size 1-NN top-1 and mAP@k side by side, their cascades, and one figure."""
    results = [read_retrieval(f) for f in folders]
    names = run_names([{"dir": r["dir"]} for r in results])
    table: dict[int, dict] = {}
    cascade_rows = []
    fig, axes = _retrieval_figure(title)
    for name, r in zip(names, results):
        k = r["k"]
        for row in r["rows"]:
            entry = table.setdefault(row["dim"], {"dim": row["dim"]})
            entry[f"{name} 1-NN top-1"] = row["nn1_top1"]
            entry[f"{name} mAP@{k}"] = row[f"map_at_{k}"]
        cascade_rows += [{"run": name, "method": c["method"], "stages": c["stages"], "1-NN top-1": c["nn1_top1"],
                          f"mAP@{k}": c[f"map_at_{k}"], "cost ratio": c.get("cost_ratio")} for c in r["cascades"]]
        draw_retrieval(axes, r["rows"], r["cascades"], k, label=name if len(results) > 1 else "")
    _save(fig, out / "retrieval.png")
    keys = list(dict.fromkeys(key for row in table.values() for key in row))
    rows = [{key: table[m].get(key) for key in keys} for m in sorted(table)]
    text = "retrieval (%; mAP@k divided by min(k, relevant))\n\n" + markdown_table(rows)
    if cascade_rows:
        text += "\nadaptive and funnel retrieval\n\n" + markdown_table(cascade_rows)
    atomic_write_text(out / "retrieval.md", text)
    atomic_write_text(out / "retrieval.csv", rows_to_csv(rows))
    return {"retrieval_png": out / "retrieval.png", "retrieval_csv": out / "retrieval.csv",
            "retrieval_md": out / "retrieval.md"}


def write_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """``mrl-vision report``: read the runs, write ``accuracy_vs_dims.{png,csv,md}`` and, when a run has
    a cascade, ``adaptive.{png,csv,md}`` into ``out_dir``; when a run has a 2D Matryoshka grid, its
    blocks x dims table goes into ``accuracy_vs_dims.md`` and its heatmap into ``grid.png`` (the cells in
    ``grid.csv``); ``mrl-vision retrieve`` folders among them give ``retrieval.{png,csv,md}`` (all
    crash-safe). Returns the written paths."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    retrieval = [Path(d) for d in run_dirs if (Path(d) / "retrieval.csv").is_file()]
    run_dirs = [d for d in run_dirs if Path(d) not in retrieval]
    written = _write_retrieval_report(retrieval, Path(out_dir), title) if retrieval else {}
    if not run_dirs:
        return written
    return {**_write_accuracy_report(run_dirs, out_dir, title), **written}


def _grid_report(runs: list[dict], out: Path) -> tuple[dict[str, Path], str]:
    """The 2D Matryoshka runs' grids: ``grid.png`` (a heatmap per run) and ``grid.csv`` (``run, layers,
    dims, top1[, top5]``) in ``out``, and their Markdown tables (rows = blocks, columns = sizes).
    Nothing (``({}, "")``) when no run has a grid."""
    labels = [r["label"] for r in runs]
    panels: dict[str, list[dict]] = {}
    text, csv_rows = "", []
    for run, folder in zip(runs, run_names(runs)):
        if not run.get("grid"):
            continue
        name = run["label"] if labels.count(run["label"]) == 1 else f"{run['label']} ({folder})"
        panels[f"{name} ({run['grid_split']} split)"] = run["grid"]
        text += (f"\n{name}: top-1 accuracy (%) by transformer blocks (rows) and embedding dimensions (columns), "
                 f"{run['grid_split']} split\n\n" + markdown_table(grid_table(run["grid"])))
        csv_rows += [{"run": folder, **r} for r in run["grid"]]
    if not panels:
        return {}, ""
    written = {"grid_png": out / "grid.png", "grid_csv": out / "grid.csv"}
    plot_grid(panels, written["grid_png"])
    atomic_write_text(written["grid_csv"], grid_to_csv(csv_rows))
    return written, text


def _write_accuracy_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, title: str = "") -> dict[str, Path]:
    runs = [read_run_results(d) for d in run_dirs]
    series = collect_series(runs)
    out = Path(out_dir)
    table = comparison_rows(series)
    written = {"png": out / "accuracy_vs_dims.png", "csv": out / "accuracy_vs_dims.csv", "md": out / "accuracy_vs_dims.md"}
    splits = sorted({r["split"] for r in runs})
    heading = title or f"top-1 accuracy (%) vs embedding dimensions ({'/'.join(splits)} split)"
    plot_accuracy(series, written["png"], title=heading)
    atomic_write_text(written["csv"], rows_to_csv(table))
    grids, grid_md = _grid_report(runs, out)
    atomic_write_text(written["md"], f"{heading}\n\n" + markdown_table(table) + grid_md)
    written.update(grids)
    adaptive_rows = []
    for run, folder in zip(runs, run_names(runs)):
        a = run.get("adaptive")
        if a and a["chosen"]:
            largest = run["rows"][-1]
            adaptive_rows.append({"run": folder, "label": run["label"], "split": a["split"],
                                  "cascade top1": a["chosen"]["top1"], "expected dims": a["chosen"]["expected_dims"],
                                  "largest dims": largest["dims"], "largest top1": largest["top1"]})
    if plot_adaptive(runs, out / "adaptive.png"):
        written["adaptive_png"] = out / "adaptive.png"
        atomic_write_text(out / "adaptive.csv", rows_to_csv(adaptive_rows))
        atomic_write_text(out / "adaptive.md", markdown_table(adaptive_rows))
        written["adaptive_csv"], written["adaptive_md"] = out / "adaptive.csv", out / "adaptive.md"
    return written
