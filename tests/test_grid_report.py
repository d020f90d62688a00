"""The 2D Matryoshka (block, size) grid in reports: grid_rows, its CSV and heatmap, the AccuracyReport
callback's {stage}_grid.* files, and `mrl-vision report` (issue 13). No model is trained here."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from mrl_vision.callbacks import AccuracyReport
from mrl_vision.matryoshka2d import grid_key
from mrl_vision.report import format_grid, grid_rows, read_grid, read_run_results, write_grid_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEPTH, DIMS = 3, (8, 16)


def _metrics(prefix: str = "test/") -> dict[str, float]:
    """What a task with eval_layers [1, 2, 3] logs: blocks 1 and 2 as grid keys, block 3 as the 1D keys."""
    m = {}
    for k in (1, 2):
        for j, d in enumerate(DIMS):
            m[f"{prefix}top1@{grid_key(k, d)}"] = 0.125 * (2 * k + j)
            m[f"{prefix}top5@{grid_key(k, d)}"] = 0.5 + 0.0625 * (2 * k + j)
    for j, d in enumerate(DIMS):
        m[f"{prefix}top1@{d}"] = 0.75 + 0.125 * j
        m[f"{prefix}top5@{d}"] = 1.0
    return m


EXPECTED = [
    {"layers": 1, "dims": 8, "top1": 25.0, "top5": 62.5},
    {"layers": 1, "dims": 16, "top1": 37.5, "top5": 68.75},
    {"layers": 2, "dims": 8, "top1": 50.0, "top5": 75.0},
    {"layers": 2, "dims": 16, "top1": 62.5, "top5": 81.25},
    {"layers": 3, "dims": 8, "top1": 75.0, "top5": 100.0},
    {"layers": 3, "dims": 16, "top1": 87.5, "top5": 100.0},
]


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _run(folder: Path, grid: list[dict] | None = None, stage: str = "test") -> Path:
    """A CSV-logger version folder: metrics.csv with the 1D test keys (and a grid column the report
    must ignore), and ``{stage}_grid.csv`` when ``grid`` is given."""
    folder.mkdir(parents=True)
    _write_csv(folder / "metrics.csv", [{"epoch": 0, "step": 10, "test/top1@8": 0.5, "test/top5@8": 0.9,
                                         "test/top1@16": 0.625, "test/top5@16": 0.95, "test/top1@L2/8": 0.25}])
    if grid is not None:
        _write_csv(folder / f"{stage}_grid.csv", grid)
    return folder


def test_grid_rows_turns_logged_keys_into_the_grid():
    """grid_rows loses the full-depth row, mixes in another stage's or unrelated keys, or is not in percent."""
    metrics = {**_metrics("test/"), **_metrics("val/"), "test/loss": 1.0, "test/top1@L1/x": 0.3,
               "test/knn_top1@8": 0.2, "adaptive/top1": 0.9, "test/top1@Lx/8": 0.1}
    metrics["val/top1@L1/8"] = 0.0  # another stage: must not leak in
    assert grid_rows(metrics, "test/", DEPTH) == EXPECTED  # dyadic fractions: exact
    assert grid_rows({"test/top1@8": 0.5, "test/top5@8": 0.9}, "test/", DEPTH) == []  # a 1D run has no grid
    with pytest.raises(ValueError, match="block 3"):  # the full depth is never a grid key
        grid_rows({"test/top1@L3/8": 0.5}, "test/", DEPTH)
    with pytest.raises(ValueError, match="depth"):
        grid_rows(metrics, "test/", 0)


def test_grid_csv_round_trips_and_the_heatmap_is_a_png(tmp_path):
    """write_grid_report's CSV does not read back as the same rows, its columns are not layers, dims,
    top1, top5, the PNG is missing or not a PNG, or a temporary file is left behind."""
    csv_path, png_path = write_grid_report(EXPECTED, tmp_path, stem="test_grid", title="ViT grid")
    assert (csv_path, png_path) == (tmp_path / "test_grid.csv", tmp_path / "test_grid.png")
    assert csv_path.read_text().splitlines()[0] == "layers,dims,top1,top5"
    assert read_grid(csv_path) == EXPECTED
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_grid.csv", "test_grid.png"]
    with pytest.raises(ValueError, match="no grid rows"):
        write_grid_report([], tmp_path)


def test_heatmap_cells_are_the_grid(tmp_path):
    """The heatmap's image is not blocks (y, full depth on top) x sizes (x), or a cell's label is not its top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mrl_vision.report import draw_grid

    fig, ax = plt.subplots()
    image = draw_grid(ax, EXPECTED)
    plt.close(fig)
    assert image.get_array().tolist() == [[25.0, 37.5], [50.0, 62.5], [75.0, 87.5]]
    assert image.origin == "lower"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{r['top1']:.1f}" for r in EXPECTED)


def test_format_grid_has_a_row_per_block_and_a_column_per_size():
    """The printed grid is not one line per block with the top-1 of each size, or hides a missing cell."""
    text = format_grid([r for r in EXPECTED if (r["layers"], r["dims"]) != (2, 16)], "title")
    lines = text.splitlines()
    assert lines[0] == "title" and lines[1].split()[-2:] == ["8", "16"]
    assert [line.split() for line in lines[2:]] == [["1", "25.00", "37.50"], ["2", "50.00", "-"], ["3", "75.00", "87.50"]]


def test_callback_writes_the_grid_beside_the_accuracy(tmp_path, caplog):
    """AccuracyReport does not write {stage}_grid.csv/.png next to {stage}_accuracy.* for a task with
    eval_layers, does not print the grid, writes one for a 1D task, or writes from a rank other than 0."""
    caplog.set_level(logging.INFO)
    model = SimpleNamespace(backbone_name="vit_test", head_kind="mrl")
    task = SimpleNamespace(model=model, eval_layers=[1, 2, DEPTH])

    def trainer(folder: Path, zero: bool = True):
        return SimpleNamespace(callback_metrics=_metrics("val/"), log_dir=str(folder), default_root_dir=str(folder),
                               is_global_zero=zero)

    report = AccuracyReport()
    report.on_fit_end(trainer(tmp_path / "a"), task)
    assert report.grid == EXPECTED  # dyadic fractions: exact
    assert read_grid(tmp_path / "a" / "val_grid.csv") == EXPECTED
    assert (tmp_path / "a" / "val_grid.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "a" / "val_accuracy.csv").is_file()
    assert "blocks \\ dims" in caplog.text and "87.50" in caplog.text

    report.on_fit_end(trainer(tmp_path / "b"), SimpleNamespace(model=model, eval_layers=None))
    assert report.grid == [] and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["val_accuracy.csv", "val_accuracy.png"]
    report.on_fit_end(trainer(tmp_path / "c", zero=False), task)
    assert not (tmp_path / "c").exists()


def test_report_includes_a_runs_grid(tmp_path):
    """`mrl-vision report` on a 2D Matryoshka run drops its grid from the Markdown, prefers val over
    test, writes no heatmap, or changes the 1D table above the grid."""
    run = _run(tmp_path / "vit2d" / "version_0", EXPECTED)
    _write_csv(run / "val_grid.csv", [{"layers": 1, "dims": 8, "top1": 1.0}])  # test wins
    result = read_run_results(run)
    assert result["grid"] == EXPECTED and result["grid_split"] == "test"
    flat = _run(tmp_path / "flat" / "version_0")  # a 1D run beside it: in the table, no grid section
    written = write_report([run, flat], tmp_path / "report")
    md = written["md"].read_text()
    assert md.startswith("top-1 accuracy (%) vs embedding dimensions (test split)\n\n"
                         "| dims | MRL (vit2d/version_0) | MRL (flat/version_0) |\n")
    assert md.count("by transformer blocks") == 1
    grid_md = md[md.index("MRL (vit2d/version_0): top-1 accuracy (%) by transformer blocks"):]
    assert grid_md.splitlines()[2:] == ["| layers | 8 | 16 |", "|---|---|---|", "| 1 | 25.00 | 37.50 |",
                                        "| 2 | 50.00 | 62.50 |", "| 3 | 75.00 | 87.50 |"]
    assert written["grid_png"] == tmp_path / "report" / "grid.png"
    assert written["grid_png"].read_bytes()[:8] == PNG_MAGIC
    with open(written["grid_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "layers", "dims", "top1", "top5"] and {r["run"] for r in rows} == {"vit2d/version_0"}
    assert [float(r["top1"]) for r in rows] == [r["top1"] for r in EXPECTED]


def test_report_without_a_grid_is_unchanged(tmp_path):
    """A run without a grid (a grid column in metrics.csv but no *_grid.csv) is reported differently
    than before issue 13: other files, or other Markdown and CSV text."""
    run = _run(tmp_path / "run" / "version_0")
    assert "grid" not in read_run_results(run)
    written = write_report([run], tmp_path / "report")
    assert set(written) == {"png", "csv", "md"}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in written.values())
    assert written["md"].read_text() == ("top-1 accuracy (%) vs embedding dimensions (test split)\n\n"
                                         "| dims | MRL |\n|---|---|\n| 8 | 50.00 |\n| 16 | 62.50 |\n")
    assert written["csv"].read_text() == "dims,MRL\n8,50.0\n16,62.5\n"
