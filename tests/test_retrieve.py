"""``mrl-vision retrieve`` and its report: embed -> retrieve round trip on the quickstart digits through the
real entry point (timm's tiny ``test_resnet``, briefly trained), the figures checked against a search
done here by hand from ``model.features``; ``mrl-vision report`` reading the folder; bad inputs refused
before any search."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mrl_vision.cli import main
from mrl_vision.embeddings import load_embeddings, read_embeddings_info
from mrl_vision.model import MatryoshkaModel
from mrl_vision.retrieval import metric_columns

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits(tmp_path_factory, quickstart_run):
    """A short real fit of the quickstart digits, and its train and test splits embedded by `mrl-vision embed`."""
    work = tmp_path_factory.mktemp("retrieve")
    run = quickstart_run.run
    for split in ("train", "test"):
        main(["embed", "--ckpt_path", str(run), "--split", split, "--out", str(work / f"emb-{split}")])
    return SimpleNamespace(work=work, run=run, train=work / "emb-train", test=work / "emb-test")


def test_retrieve_round_trip_quickstart(digits, tmp_path, capsys):
    """`retrieve` does not give, at every size, the 1-NN top-1 of a search done by hand on the model's own
    features (prefix, L2-normalise, cosine), or writes files with other columns than the issue's."""
    out = tmp_path / "retrieval"
    main(["retrieve", "--database", str(digits.train), "--queries", str(digits.test), "--k", "5",
          "--adaptive", "8:50:96", "--funnel", "16:200,32:50,96:5", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = _csv(out / "retrieval.csv")
    assert list(rows[0])[:8] == metric_columns(5) == [
        "dim", "nn1_top1", "knn_top1", "map_at_5_ref", "map_at_5", "precision_at_5", "recall_at_5", "hit_at_5"]
    assert [int(r["dim"]) for r in rows] == [8, 16, 32, 64, 96]  # every size in the sidecar
    # by hand, from the stored features (tests/test_embed.py checks they are model.features of each split)
    feats, labels = {}, {}
    for split, folder in (("train", digits.train), ("test", digits.test)):
        feats[split], labels[split] = load_embeddings(folder)
    for r in rows:
        m = int(r["dim"])
        db = torch.nn.functional.normalize(feats["train"][:, :m], dim=1)
        q = torch.nn.functional.normalize(feats["test"][:, :m], dim=1)
        nn = (q @ db.T).argmax(1)
        top1 = (labels["train"][nn] == labels["test"]).float().mean().item() * 100
        assert float(r["nn1_top1"]) == pytest.approx(top1, abs=0.21)  # at most one near-tie of 500 queries differs
        assert 0 <= float(r["map_at_5_ref"]) <= float(r["map_at_5"]) <= 100
    cascades = _csv(out / "retrieval_cascades.csv")
    assert [(c["method"], c["stages"]) for c in cascades] == [("adaptive", "8:50,96:5"), ("funnel", "16:200,32:50,96:5")]
    n = len(labels["train"])
    assert float(cascades[0]["cost"]) == n * 8 + 50 * 96
    assert float(cascades[0]["cost_ratio"]) == pytest.approx(n * 96 / (n * 8 + 50 * 96))
    meta = json.loads((out / "retrieval.json").read_text())
    assert meta["database"]["count"] == n and meta["queries"]["split"] == "test" and meta["k"] == 5
    assert "map_at_5_ref" in meta["map_conventions"] and len(meta["rows"]) == 5
    assert (out / "retrieval.png").stat().st_size > 0
    assert "map_at_5_ref divides by 5" in printed and "adaptive" in printed and "funnel" in printed

    report = tmp_path / "report"
    main(["report", str(out), "--out", str(report)])
    printed = capsys.readouterr().out
    table = _csv(report / "retrieval.csv")
    assert [int(r["dim"]) for r in table] == [8, 16, 32, 64, 96]
    assert float(table[-1]["retrieval 1-NN top-1"]) == pytest.approx(float(rows[-1]["nn1_top1"]))
    assert (report / "retrieval.png").is_file() and "adaptive and funnel retrieval" in printed
    # a retrieval folder beside a classification run: both reports
    main(["report", str(out), str(digits.run), "--out", str(report)])
    assert (report / "accuracy_vs_dims.csv").is_file()


def test_faiss_index_matches_exact(digits, tmp_path):
    """The faiss flat index does not give the exact backend's figures on the same embeddings."""
    pytest.importorskip("faiss")
    for index in ("exact", "flat"):
        main(["retrieve", "--database", str(digits.train), "--queries", str(digits.test), "--dims", "8", "96",
              "--index", index, "--out", str(tmp_path / index)])
    exact, flat = _csv(tmp_path / "exact" / "retrieval.csv"), _csv(tmp_path / "flat" / "retrieval.csv")
    for a, b in zip(exact, flat):
        for key in metric_columns(10)[1:]:
            assert float(a[key]) == pytest.approx(float(b[key]), abs=0.21), key


def _copy(folder: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(folder, dest)
    if edit is not None:
        info = json.loads((dest / "embeddings.json").read_text())
        edit(info)
        (dest / "embeddings.json").write_text(json.dumps(info))
    return dest


def _fingerprint(info: dict) -> None:
    info["model"]["fingerprint"] = "sha256:" + "0" * 64


def _unlabeled(info: dict) -> None:
    info["labelled"] = False


@pytest.mark.parametrize("args, message", [
    (["--dims", "8", "128"], "128"),                       # a dim above the width (96)
    (["--k", "100000"], "100000"),                         # k larger than the database
    (["--adaptive", "8:200"], "8:200"),                    # a malformed cascade
    (["--funnel", "16:10,32:50"], "16:10,32:50"),          # shortlists that grow
    (["--index", "ivf"], "ivf"),                           # argparse: not a choice
])
def test_bad_options_fail_before_search(digits, tmp_path, args, message, capsys):
    """A bad option is not refused with a message naming it, or something is written."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["retrieve", "--database", str(digits.train), "--queries", str(digits.test), "--out", str(out), *args])
    text = str(e.value) + capsys.readouterr().err
    assert message in text
    assert not out.exists()


@pytest.mark.parametrize("edit, message", [
    (_fingerprint, "different models: fingerprint"),
    (_unlabeled, "unlabeled"),
])
def test_mismatched_folders_refused(digits, tmp_path, edit, message):
    """Queries from another model (or without labels) are searched against the database anyway."""
    queries = _copy(digits.test, tmp_path / "queries", edit)
    with pytest.raises(SystemExit, match=message):
        main(["retrieve", "--database", str(digits.train), "--queries", str(queries), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_different_widths_refused(digits, tmp_path):
    """Embeddings of another width are compared with the database's."""
    queries = _copy(digits.test, tmp_path / "queries")
    info = read_embeddings_info(queries)
    for shard in info["shards"]:
        path = queries / shard["embeddings"]
        np.save(path, np.load(path)[:, :64])
    info["width"] = 64
    info["model"].pop("width")
    (queries / "embeddings.json").write_text(json.dumps(info))
    assert load_embeddings(queries)[0].shape[1] == 64  # a consistent folder by itself
    with pytest.raises(SystemExit, match="width 96.*64"):
        main(["retrieve", "--database", str(digits.train), "--queries", str(queries), "--out", str(tmp_path / "out")])


def test_missing_folder_is_one_line(digits, tmp_path):
    with pytest.raises(SystemExit, match="mrl-vision retrieve: error: .*missing"):
        main(["retrieve", "--database", str(tmp_path / "missing"), "--queries", str(digits.test), "--out",
              str(tmp_path / "out")])


def test_embedding_fingerprint_tells_models_apart(digits):
    """Two different weights give the same fingerprint, or the same weights loaded twice differ."""
    from mrl_vision.model import weights_fingerprint

    a = MatryoshkaModel.load(digits.run / "checkpoints" / "last.ckpt")
    b = MatryoshkaModel.load(digits.run / "checkpoints" / "last.ckpt")
    assert weights_fingerprint(a) == weights_fingerprint(b) == read_embeddings_info(digits.train)["model"]["fingerprint"]
    with torch.no_grad():
        b.head.linears[0].weight[0, 0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)
