"""litdata streaming: ``mrl-vision prepare --format litdata`` and ``StreamingDataModule`` (local folders, CPU).

- prepare writes the source's images in order, with its sidecar, atomically; refuses to overwrite; fails
  naming an unreadable image and leaves nothing behind.
- evaluation reads exactly what ``ImageFolderDataModule`` reads from the same tree; ``uint8`` batches
  normalised after the transfer equal batches normalised in the workers.
- training streams every sample once per epoch in a seeded shuffle; under 2-process DDP the ranks' shares
  are disjoint and cover the set; a run killed mid-epoch (SIGKILL) and resumed from its last checkpoint
  continues with the samples it had not seen (the 2-process test ``mrl-vision test`` equals 1 process is
  in ``test_ddp.py``).
- bad input fails before training, naming the value: a missing folder, a folder without index or
  sidecar, a foreign index, a class count that disagrees, an unreachable or unsupported URL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("litdata")

from conftest import write_jpeg_tree  # noqa: E402
from mrl_vision.cli import cli, main  # noqa: E402
from mrl_vision.data import ImageFolderDataModule, StreamingDataModule  # noqa: E402
from mrl_vision.data.beton import _host  # noqa: E402
from mrl_vision.data.chunks import SIDECAR_NAME, check_chunks, write_chunks  # noqa: E402

IDS = 24  # the identity tree: one class per image, so a batch's labels name its samples


def _prepare(source: Path, out: Path, *extra: str) -> None:
    main(["prepare", str(source), str(out), "--format", "litdata", "--num-workers", "1", *extra])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A JPEG tree (3 classes, 8 train and 7 val images each, odd sizes) and its litdata folders."""
    root = tmp_path_factory.mktemp("streaming")
    images = write_jpeg_tree(root / "images", train_per_class=8, val_per_class=7, seed=5)
    for split in ("train", "val"):
        write_chunks(str(images / split), root / "lit" / split, num_workers=1)
    return root


def _dm(tree: Path, **kwargs) -> StreamingDataModule:
    args = dict(image_size=32, eval_image_size=32, batch_size=4, num_workers=0)
    return StreamingDataModule(str(tree / "lit" / "train"), str(tree / "lit" / "val"), **{**args, **kwargs})


def _labels(loader) -> list[int]:
    return [int(y) for _, labels in loader for y in labels]


# ----------------------------------------------------------------------------- prepare
def test_prepare_writes_the_source_in_order_with_its_sidecar(tree):
    """prepare reorders the images, changes their bytes, or records wrong facts in its sidecar."""
    import litdata

    out = tree / "lit" / "train"
    info = json.loads((out / SIDECAR_NAME).read_text())
    assert info["format"] == "mrl-vision-litdata" and info["num_samples"] == 24 and info["classes"] == ["cat", "dog", "fox"]
    assert info["source"] == "train" and info["write_options"]["max_resolution"] is None
    assert check_chunks(out) == info
    files = sorted((tree / "images" / "train").glob("*/*.jpg"))
    stream = litdata.StreamingDataset(str(out))
    for i in (0, 9, 23):
        item = stream[i]
        assert item["image"] == files[i].read_bytes()  # the file's own bytes
        assert item["label"] == ["cat", "dog", "fox"].index(files[i].parent.name)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_prepare_refuses_to_overwrite_and_replaces_with_the_flag(tree, tmp_path, capsys):
    """prepare overwrites without --overwrite, fails with it, or replaces a folder it did not write."""
    out = tmp_path / "val"
    _prepare(tree / "images" / "val", out)
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        _prepare(tree / "images" / "train", out)
    _prepare(tree / "images" / "train", out, "--overwrite", "--limit", "2")
    assert json.loads((out / SIDECAR_NAME).read_text())["num_samples"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="holds files that mrl-vision did not write"):
        _prepare(tree / "images" / "val", foreign, "--overwrite")
    assert (foreign / "mine.txt").read_text() == "keep"


def test_prepare_fails_naming_an_unreadable_image_and_writes_nothing(tmp_path):
    """A broken image is written, or the failure does not name it, or leaves a folder behind."""
    images = write_jpeg_tree(tmp_path / "images")
    bad = images / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(SystemExit, match="broken.jpg"):
        _prepare(images / "train", tmp_path / "out" / "train")
    assert not (tmp_path / "out" / "train").exists() and list((tmp_path / "out").iterdir()) == []


def test_prepare_options_of_the_other_format_are_refused(tree, tmp_path, capsys):
    """An FFCV-only option is ignored for litdata (or the reverse) instead of being refused."""
    with pytest.raises(SystemExit):
        _prepare(tree / "images" / "val", tmp_path / "x", "--write-mode", "jpg")
    assert "--write-mode apply to --format ffcv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", str(tree / "images" / "val"), str(tmp_path / "x.beton"), "--chunk-bytes", "1MB"])
    assert "--chunk-bytes applies to --format litdata" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="writes a local folder"):
        _prepare(tree / "images" / "val", "s3://bucket/val")


def test_prepare_quickstart_and_max_resolution(tmp_path):
    """The digits or a resolution cap are not written as decodable images of the right size."""
    _prepare("quickstart", tmp_path / "digits", "--split", "val", "--limit", "2")
    dm = StreamingDataModule(val_path=str(tmp_path / "digits"), eval_image_size=28, eval_crop_ratio=1.0, num_workers=0,
                             mean=[0.5] * 3, std=[0.5] * 3)
    x, y = next(iter(dm.eval_dataloader("val", batch_size=20)))
    assert dm.class_names == [str(d) for d in range(10)] and x.shape == (20, 3, 28, 28) and sorted(set(y.tolist())) == list(range(10))
    big = tmp_path / "big" / "a"
    big.mkdir(parents=True)
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(big / "x.png")
    _prepare(tmp_path / "big", tmp_path / "small", "--max-resolution", "40")
    import litdata

    item = litdata.StreamingDataset(str(tmp_path / "small"))[0]
    assert Image.open(__import__("io").BytesIO(item["image"])).size == (40, 30)


def test_a_killed_prepare_leaves_a_folder_the_next_one_removes(tree, tmp_path, capsys):
    """A temporary folder of a dead prepare stays forever beside the output."""
    stale = tmp_path / f".val.{_host()}.pid999999999.abcd1234.tmp"
    stale.mkdir()
    (stale / "chunk-0-0.bin").write_bytes(b"x" * 10)
    _prepare(tree / "images" / "val", tmp_path / "val")
    assert not stale.exists() and "left by a prepare that was killed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- reading
def test_evaluation_reads_what_the_image_folder_module_reads(tree):
    """The streamed evaluation images or labels differ from the same tree read by ImageFolderDataModule."""
    stream = _dm(tree, eval_crop_ratio=0.875)
    folder = ImageFolderDataModule(str(tree / "images"), image_size=32, eval_crop_ratio=0.875, batch_size=4, num_workers=0)
    assert stream.class_names == folder.class_names and stream.num_samples("val") == 21
    for split in ("val", "train"):
        a, b = list(stream.eval_dataloader(split)), list(folder.eval_dataloader(split))
        assert len(a) == len(b) == 6  # 24 and 21 images, batches of 4
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_uint8_batches_normalised_after_the_transfer_equal_worker_normalisation(tree):
    """Normalising on the device gives other values than normalising in the workers."""
    dm = _dm(tree, normalize_on_device=True, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    ref = [b[0] for b in dm.eval_dataloader("val")]  # no trainer: normalised in the workers
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    raw = list(dm.val_dataloader())
    assert raw[0][0].dtype == torch.uint8
    for (x, y), r in zip(raw, ref):
        out = dm.on_after_batch_transfer(dm.on_before_batch_transfer([x, y], 0), 0)
        assert out[0].dtype == torch.float32 and torch.allclose(out[0], r, atol=1e-5)
    views = _dm(tree, views=2)
    x, y = next(iter(views.train_dataloader()))
    assert x.shape == (4, 2, 3, 32, 32) and not torch.equal(x[:, 0], x[:, 1])


def test_training_streams_every_sample_once_per_epoch_in_a_seeded_shuffle(tmp_path):
    """An epoch repeats or skips samples, epochs share one order, or the seed does not fix the order."""
    root = _identity_setup(tmp_path)

    def dm(**kwargs):
        return StreamingDataModule(str(root / "lit" / "train"), image_size=32, batch_size=4, num_workers=1, **kwargs)

    loader = dm().train_dataloader()
    epochs = [_labels(loader) for _ in range(2)]
    assert all(sorted(order) == list(range(IDS)) for order in epochs) and epochs[0] != epochs[1]
    assert _labels(dm().train_dataloader()) == epochs[0]
    assert _labels(dm(seed=7).train_dataloader()) != epochs[0]
    assert _labels(dm(shuffle=False).train_dataloader()) == list(range(IDS))


def test_training_batch_rules(tree):
    """drop_last keeps the partial batch, or a batch larger than the data is not refused with drop_last."""
    assert [len(y) for _, y in _dm(tree, batch_size=5).train_dataloader()] == [5, 5, 5, 5, 4]
    assert [len(y) for _, y in _dm(tree, batch_size=5, drop_last=True).train_dataloader()] == [5, 5, 5, 5]
    assert len(list(_dm(tree, batch_size=64).train_dataloader())) == 1  # the default keeps a small folder usable
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 24 training samples"):
        _dm(tree, batch_size=64, drop_last=True).train_dataloader()


# ----------------------------------------------------------------------------- bad input
def test_bad_folders_fail_before_training_naming_them(tree, tmp_path):
    """A missing, empty, foreign or mismatched folder is accepted, or its error does not say what is wrong."""
    import litdata

    with pytest.raises(FileNotFoundError, match="'nowhere/train' does not exist"):
        StreamingDataModule("nowhere/train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        StreamingDataModule(str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        StreamingDataModule(str(tmp_path / "empty"))
    litdata.optimize(fn=_item, inputs=list(range(4)), output_dir=str(tmp_path / "other"), num_workers=1, chunk_bytes="1MB",
                     start_method="fork", verbose=False)
    with pytest.raises(FileNotFoundError, match="has no mrl_vision.json: it was not written by"):
        StreamingDataModule(str(tmp_path / "other"))
    swapped = tmp_path / "swapped"
    shutil.copytree(tree / "lit" / "val", swapped)
    shutil.copy(tree / "lit" / "train" / "index.json", swapped / "index.json")
    with pytest.raises(ValueError, match="not the index that `mrl-vision prepare` wrote"):
        StreamingDataModule(str(tree / "lit" / "train"), str(swapped))
    with pytest.raises(ValueError, match="has 3 classes but the data module expects num_classes=5"):
        _dm(tree, num_classes=5)
    write_jpeg_tree(tmp_path / "two", classes=("cat", "dog"))
    write_chunks(str(tmp_path / "two" / "val"), tmp_path / "two-val", num_workers=1)
    with pytest.raises(ValueError, match="disagree on their classes"):
        StreamingDataModule(str(tree / "lit" / "train"), str(tmp_path / "two-val"))
    with pytest.raises(ValueError, match="give a local folder or an s3://BUCKET/PREFIX URL"):
        StreamingDataModule("http://example.com/train")


def _item(i: int) -> dict:
    return {"image": b"x", "label": i}


def test_an_unreachable_object_store_fails_in_seconds(tmp_path):
    """An unreachable s3:// URL hangs in retries (litdata's client retries 1000 times) or fails unclearly."""
    start = time.time()
    with pytest.raises(ValueError, match=r"cannot read s3://mrl-vision-none/train/index.json: EndpointConnectionError"):
        StreamingDataModule("s3://mrl-vision-none/train", storage_options={
            "endpoint_url": "http://127.0.0.1:9", "aws_access_key_id": "x", "aws_secret_access_key": "y"})
    assert time.time() - start < 60


def test_an_s3_bucket_streams_like_the_local_folder(tree, tmp_path):
    """Reading s3:// (an S3-protocol server on this machine: moto) differs from the local folder, or the
    training stream does not cache its chunks in cache_dir."""
    moto_server = pytest.importorskip("moto.server")
    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "aws_access_key_id": "x", "aws_secret_access_key": "y",
                   "region_name": "us-east-1"}
        client = boto3.client("s3", **options)
        client.create_bucket(Bucket="data")
        for split in ("train", "val"):
            for f in (tree / "lit" / split).iterdir():
                client.upload_file(str(f), "data", f"lit/{split}/{f.name}")
        remote = StreamingDataModule("s3://data/lit/train", "s3://data/lit/val/", image_size=32, eval_image_size=32,
                                     batch_size=4, num_workers=1, storage_options=options, cache_dir=str(tmp_path / "cache"))
        assert remote.num_classes == 3 and remote.num_samples("val") == 21
        for (xa, ya), (xb, yb) in zip(remote.eval_dataloader("val"), _dm(tree).eval_dataloader("val")):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        local = sorted(_labels(_dm(tree, num_workers=1).train_dataloader()))
        assert sorted(_labels(remote.train_dataloader())) == local
        assert any(p.is_file() for p in (tmp_path / "cache").rglob("*.bin"))
        with pytest.raises(FileNotFoundError, match="has no index.json"):
            StreamingDataModule("s3://data/lit/nothing", storage_options=options)
    finally:
        server.stop()


def test_cli_names_a_bad_folder_before_training(tree, run_dir):
    """`fit` with a class count that disagrees starts training or fails with a traceback."""
    with pytest.raises(SystemExit) as exc:  # one line: the data module's own message
        cli(["fit", "--model.backbone", "test_resnet", "--trainer.accelerator", "cpu",
             "--data", "mrl_vision.data.StreamingDataModule", "--data.train_path", str(tree / "lit" / "train"),
             "--data.val_path", str(tree / "lit" / "val"), "--data.num_classes", "5"])
    message = str(exc.value)
    assert message.startswith("mrl-vision fit: error: ") and "\n" not in message
    assert "has 3 classes but the data module expects num_classes=5" in message


# ----------------------------------------------------------------------------- training runs
def _identity_setup(root: Path) -> Path:
    """``IDS`` classes of one training and one validation image each, as litdata folders, and a config whose
    callback (``seen.RecordLabels``) records each training batch's labels per rank."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(IDS):
            folder = root / "ids" / split / f"c{c:02d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "a.jpg")
        write_chunks(str(root / "ids" / split), root / "lit" / split, num_workers=1)
    (root / "seen.py").write_text(SEEN_CALLBACK)
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "max_epochs": 2, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                       "limit_val_batches": 1, "enable_model_summary": False,
                       "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                  "init_args": {"save_dir": "runs", "name": "t"}},
                       "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                      "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}},
                                     {"class_path": "seen.RecordLabels"}]},
           "model": {"backbone": "test_resnet"},
           "data": {"class_path": "mrl_vision.data.StreamingDataModule",
                    "init_args": {"train_path": "lit/train", "val_path": "lit/val", "image_size": 32,
                                  "eval_image_size": 32, "batch_size": 4, "num_workers": 1}}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


SEEN_CALLBACK = '''
import json, os, signal
import lightning as L


class RecordLabels(L.Callback):
    """Appends each training batch's labels to seen-RANK.jsonl; SIGKILLs this process at ``kill_at_step``."""

    def __init__(self, kill_at_step: int = -1) -> None:
        self.kill_at_step = kill_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(f"seen-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "labels": batch[1].tolist()}) + "\\n")
'''


def _seen(root: Path) -> dict[int, list[int]]:
    """Every recorded label, by epoch, over all ranks."""
    by_epoch: dict[int, list[int]] = {}
    for f in sorted(root.glob("seen-*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            by_epoch.setdefault(row["epoch"], []).extend(row["labels"])
    return by_epoch


def _killed_run(args: list[str], work: Path, timeout: float = 240) -> None:
    """``python -m mrl_vision.cli ARGS`` in ``work``, expected to SIGKILL itself; its process group is
    killed afterwards (loader workers, a second rank)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "MRL_VISION_RESUME_FROM")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mrl_vision.cli", *args], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc == -signal.SIGKILL, (work / "killed.log").read_text()[-3000:]


def test_a_run_killed_mid_epoch_resumes_with_the_samples_it_had_not_seen(tmp_path):
    """A resumed run replays its epoch from the start (or skips samples), or its next epoch is empty."""
    work = _identity_setup(tmp_path)
    _killed_run(["fit", "--config", "config.yaml", "--trainer.callbacks.init_args.kill_at_step", "4"], work)
    ckpt = work / "runs" / "t" / "version_0" / "checkpoints" / "step=4.ckpt"
    first = _seen(work)
    assert ckpt.is_file() and list(first) == [0] and len(first[0]) == 16  # 4 of the epoch's 6 steps
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.syspath_prepend(str(work))
        mp.setattr(sys, "argv", ["mrl-vision"])
        c = cli(["fit", "--config", "config.yaml", "--ckpt_path", str(ckpt)])
    assert c.trainer.global_step == 12
    seen = _seen(work)
    assert sorted(seen) == [0, 1] and all(sorted(seen[e]) == list(range(IDS)) for e in (0, 1))
    state = torch.load(work / "runs" / "t" / "version_1" / "checkpoints" / "step=12.ckpt", weights_only=True)
    assert state["StreamingDataModule"]["train_loader"]["current_epoch"] == 2  # the stream's position is saved


@pytest.mark.slow
def test_two_process_training_sees_every_sample_once_per_epoch_and_resumes(tmp_path):
    """Under 2-process DDP the ranks' shares overlap or miss samples, or a killed run resumes elsewhere."""
    from conftest import run_console

    work = _identity_setup(tmp_path)
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    _killed_run(["fit", "--config", "config.yaml", *ddp, "--trainer.callbacks.init_args.kill_at_step", "4"], work)
    ckpt = work / "runs" / "t" / "version_0" / "checkpoints" / "step=4.ckpt"
    assert ckpt.is_file()
    first = _seen(work)
    assert sorted(first[0]) == list(range(IDS)) and len(first[1]) == 8  # epoch 0 whole; 1 step of epoch 1 per rank
    for f in work.glob("seen-*.jsonl"):
        assert len(f.read_text().splitlines()) == 4  # 3 + 1 steps on each rank
    run_console(["fit", "--config", "config.yaml", *ddp, "--ckpt_path", str(ckpt)], work, "resume")
    seen = _seen(work)
    assert sorted(seen[0]) == list(range(IDS)) and sorted(seen[1]) == list(range(IDS))
    assert (work / "runs" / "t" / "version_1" / "checkpoints" / "step=6.ckpt").is_file()
