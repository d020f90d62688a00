"""GPU training throughput: ResNet-50 with a plain head, MRL and MRL-E, through FFCV and with the data on the GPU.

Images per second of real training steps, in one run, for each crop size and head:

- heads: ``plain`` = the standard model (``head="ff"`` with the full width as its one size,
  ``dims=[2048]``: one ``Linear(2048, 1000)`` on the whole embedding), ``mrl`` (a classifier per
  prefix, dims 8..2048) and ``mrl_e`` (one shared classifier, all sizes in one pass);
- the model is the real ``MatryoshkaClassifier`` (timm ResNet-50 from scratch, 1000 classes,
  ``channels_last=True``, the ImageNet recipe's optimisation: SGD 0.9, weight decay 1e-4 off norms
  and biases, label smoothing 0.1, the triangular per-step LR schedule; BlurPool only with
  ``--blurpool``, cuDNN autotuning only with ``--cudnn-benchmark``, which the GPU configs turn on) trained by the real
  ``lightning.Trainer`` (one GPU, ``bf16-mixed``, ``max_steps``; no logger, checkpoints, progress
  bar or validation), optionally with ``torch.compile`` (``--compile``: the backbone and the head,
  ``nn.Module.compile`` in place; the loss, metrics and logging stay eager);
- ``FFCV`` rows: the real ``FFCVDataModule`` reading a ``.beton`` (RandomResizedCrop + flip
  decoded on the CPU by ``--workers`` threads, ``uint8`` batches copied by ``ToDevice`` and
  normalised on the GPU in bf16 in ``on_after_batch_transfer``); one module and one FFCV
  ``Loader`` serve every FFCV run, a new epoch each, resized between runs with
  ``set_train_resolution`` as ``ProgressiveResizing`` does (FFCV JIT-compiles once per ``Loader``);
- ``model only`` rows: the same Trainer and model fed one fixed ``uint8`` batch (random pixels)
  already resident on the GPU, through ``FFCVDataModule``'s own ``on_after_batch_transfer`` (the
  same normalisation) every step: the FFCV rows without the loader, the compute bound.
  ``FFCV / model only`` near 1 means the GPU is the bound; well below 1, the loader is.

Timing: a Lightning callback starts the clock when the last of ``--warmup`` steps ends (they
absorb cuDNN's first calls, FFCV's numba JIT compilation and ``torch.compile``) and stops it when the last
of ``--steps`` measured steps ends, with ``torch.cuda.synchronize()`` at those two points only
(syncing every step would drain the GPU queue between steps). img/s = images of the measured
steps / that time: the total over the measured steps, data loading waits included, not a median.
Runs are grouped by crop size: at each size, the three heads through FFCV, then the three model
only, in a head order rotated from size to size, so each head runs beside the plain head of its
size. Ratios are to the plain head of the same size and data path.

Data: real photographs, as in ``loader_throughput.py``: seeded random crops of scikit-image's
sample photos (no download) saved as JPEG (quality 90), 256-500 px on the longer side for crops
>= 128 px. ``--unique`` distinct crops are linked ``--images`` times (default: exactly one epoch
of warm-up + measured steps, so no epoch boundary falls in the timing; FFCV decodes every stored
sample anew) into ``--classes`` (1000) class folders, labels assigned round-robin: the labels carry
no meaning, only the throughput counts. One ``.beton`` is written with ``write_beton`` in FFCV's
ImageNet storage (``proportion``: half JPEG, half raw pixels, at most 500 px; ``raw`` for crops
below 128 px, the smoke run) and read at every size
(RandomResizedCrop decodes to any size), in a temporary folder under ``--workdir`` removed at the
end unless ``--keep``.

    python benchmarks/gpu_throughput.py                     # 160/176/192/224 px, 3 heads (sized for well under 6 minutes on one H100 with 16 cores)
    python benchmarks/gpu_throughput.py --sizes 176 --compile
    python benchmarks/gpu_throughput.py --no-ffcv           # the model-only rows alone
    python benchmarks/gpu_throughput.py --json results.json
    python benchmarks/gpu_throughput.py --smoke             # CPU, timm's test_resnet at 32/48 px, 2 + 2 steps (a test of the script; about 30 s on 2 cores)

Targets (issue 5), on one H100 at 176 px: MRL through FFCV >= 5,000 img/s, and MRL >= 0.97x the
plain head (the reference recipe ran about 3,000 img/s per A100). Needs ffcv for the FFCV rows
(without it they are skipped with the reason, and the model-only rows still run) and scikit-image
for the photographs. Imports neither jsonargparse nor ``mrl_vision.cli``; runs from a checkout
without installing the package.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

if "--smoke" in sys.argv[1:]:  # read when OpenMP loads, with torch: on a small, busy CPU, threads spinning
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # beside FFCV's made the steps 100x slower

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # mrl_vision from this checkout where it is not installed (the GPU machine)
    sys.path.insert(1, str(REPO))

HEADS = {"plain": "ff", "mrl": "mrl", "mrl_e": "mrl_e"}  # benchmark name -> MatryoshkaClassifier(head=...)
TARGET_SIZE, TARGET_IMG_S, TARGET_RATIO = 176, 5000.0, 0.97

warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval|"
                        r"Tensor Cores|max_epochs. was not set|LeafSpec|no `val_dataloader`).*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available: ..." at every Trainer


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def ffcv_status(no_ffcv: bool) -> str | None:
    """None when the FFCV rows can run, else why they cannot."""
    if no_ffcv:
        return "--no-ffcv"
    try:
        import ffcv  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a missing system library (OSError)
        return f"import ffcv failed ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------- data
def write_photo_beton(root: Path, size: int, images: int, unique: int, classes: int, workers: int, seed: int) -> Path:
    """``unique`` JPEG crops of real photos, linked ``images`` times into ``classes`` round-robin
    class folders, written to ``root/train.beton`` in FFCV's ImageNet storage; returns its path."""
    # the loader benchmark's photographs (benchmarks/ is on sys.path when a script runs from it)
    from loader_throughput import make_source, side_range

    from mrl_vision.data.beton import write_beton

    photos = root / "photos"
    make_source(photos, size, unique, seed)
    files = sorted(photos.glob("*/*.jpg"), key=lambda p: p.stem)  # by index: consecutive files cycle through the photos
    tree = root / "classes"
    for c in range(classes):
        (tree / f"c{c:04d}").mkdir(parents=True)
    for j in range(images):
        src, dst = files[j % len(files)], tree / f"c{j % classes:04d}" / f"{j:07d}.jpg"
        try:
            os.link(src, dst)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, dst)
    beton = root / "train.beton"
    large = size >= 128
    mode, max_res = ("proportion", 500) if large else ("raw", None)
    t0 = time.time()
    info = write_beton(str(tree), beton, write_mode=mode, max_resolution=max_res, compress_probability=0.5,
                       jpeg_quality=90, num_workers=workers, overwrite=True,
                       allow_empty_classes=True)  # the label space is `classes` wide; a short run fills few
    lo, hi = side_range(size)
    print(f"beton: {images} samples ({len(files)} distinct crops of {len({p.parent.name for p in files})} photos, "
          f"{lo}-{hi} px longer side), {classes} classes round-robin, write_mode={mode}"
          + (", compress_probability=0.5, jpeg_quality=90" if mode == "proportion" else "")
          + f", max_resolution={max_res}, {info['file_size'] / 2**20:.0f} MiB, written in {time.time() - t0:.1f} s")
    return beton


class _Repeat:
    """The same batch ``steps`` times (a loader with a length, so one epoch is the whole run)."""

    def __init__(self, batch: list[torch.Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def resident_batches(size: int, batch: int, classes: int, steps: int, device: torch.device, seed: int = 0) -> L.LightningDataModule:
    """A data module serving one ``uint8`` batch (random pixels, NCHW with channels-last strides as
    FFCV hands it over) kept on ``device``, every step, through ``FFCVDataModule``'s own
    ``on_after_batch_transfer`` (normalisation in the Trainer's precision, labels copied): the
    FFCV rows without the loader."""
    from mrl_vision.data.ffcv_loader import FFCVDataModule
    from mrl_vision.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    from mrl_vision.data.augment import BatchAugment

    class ResidentBatches(L.LightningDataModule):
        on_after_batch_transfer = FFCVDataModule.on_after_batch_transfer
        normalize = FFCVDataModule.normalize
        _trainer_attached = FFCVDataModule._trainer_attached

        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
            labels = torch.randint(0, classes, (batch,), generator=g)
            self.batch = [images.to(device), labels.to(device)]
            self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)  # what the data modules' normalize reads
            self.batch_augment = BatchAugment()  # none: the recipe's per-image augmentation is off, as in the FFCV rows
            self.views = 1  # one view per image (FFCVDataModule's views)

        def train_dataloader(self) -> _Repeat:
            return _Repeat(self.batch, steps)

    return ResidentBatches()


# ----------------------------------------------------------------------------- timing
class StepTimer(Callback):
    """Wall time of the training steps after ``warmup``: synchronised when the last warm-up step
    ends and when the last step ends (only there), images counted from the batches' labels."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.done = self.images = 0
        self.t_start = self.t0 = self.t1 = None

    @staticmethod
    def now(module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.t_start = self.now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.t0 = self.now(pl_module)
        elif self.done > self.warmup:
            self.images += int(batch[1].shape[0])
            if self.done == trainer.max_steps:
                self.t1 = self.now(pl_module)

    def result(self) -> dict[str, float]:
        if self.t1 is None:
            raise RuntimeError(f"the run ended after {self.done} steps, before its last measured step")
        return {"img_s": self.images / (self.t1 - self.t0), "images": self.images,
                "seconds": self.t1 - self.t0, "warmup_s": self.t0 - self.t_start}


def ffcv_data_module(args, beton: Path) -> L.LightningDataModule:
    """The real ``FFCVDataModule`` whose training ``Loader`` is built once and reused by every run,
    one epoch per run, resized between runs with ``set_train_resolution`` as ``ProgressiveResizing``
    does between epochs: FFCV JIT-compiles its pipeline once per ``Loader`` (seconds each time)."""
    from mrl_vision.data.ffcv_loader import FFCVDataModule

    class OneLoader(FFCVDataModule):
        _train = None

        def train_dataloader(self):
            if self._train is None:
                self._train = super().train_dataloader()
            return self._train

    return OneLoader(train_path=str(beton), image_size=min(args.sizes), batch_size=args.batch_size,
                     num_workers=args.workers, num_classes=args.classes, seed=args.seed)


def run_one(args, data: str, size: int, head: str, dm: L.LightningDataModule | None) -> dict[str, float]:
    """Train ``warmup + steps`` steps of a fresh model, from ``dm`` (FFCV) or a resident batch; the timer's figures."""
    from mrl_vision import MatryoshkaClassifier

    torch.manual_seed(args.seed)
    model = MatryoshkaClassifier(
        num_classes=args.classes, backbone=args.backbone, head=HEADS[head], dims=None, blurpool=args.blurpool,
        label_smoothing=0.1, optimizer="sgd", lr=0.2125, momentum=0.9, weight_decay=1e-4,
        lr_schedule="triangular", warmup_epochs=2, channels_last=True,
    )
    if head == "plain" and model.model.dims != [model.model.width]:
        raise RuntimeError(f"the plain head should classify the full width {model.model.width}, got dims {model.model.dims}")
    steps = args.warmup + args.steps
    if data == "ffcv":
        dm.set_train_resolution(size)
    else:
        dm = resident_batches(size, args.batch_size, args.classes, steps, torch.device(args.device), args.seed)
    if args.compile:  # backbone and head; the loss, metrics and logging stay eager
        torch._dynamo.reset()  # else every fresh model recompiles the same functions until dynamo's limit (8): then eager
        model.model.backbone.compile()
        model.model.head.compile()
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
        benchmark=True if args.cudnn_benchmark else None,
    )
    trainer.fit(model, datamodule=dm)
    out = timer.result()
    del trainer, model, dm, timer
    gc.collect()  # the FFCV loader's threads and device buffers go with it
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def targets(rows: list[dict], args, device: str) -> list[tuple[str, str]]:
    """The issue's two targets at 176 px: (description, PASS / FAIL / not evaluated ...)."""
    row = next((r for r in rows if r["size"] == TARGET_SIZE and r["head"] == "mrl"), None)
    if row is None:
        why = f"not evaluated ({TARGET_SIZE} px MRL not among the runs)"
        return [(f"MRL through FFCV >= {TARGET_IMG_S:.0f} img/s", why), (f"MRL >= {TARGET_RATIO}x plain head", why)]
    setting = "" if (args.backbone == "resnet50" and "H100" in device) else f" (the target is ResNet-50 on one H100; this: {args.backbone} on {device})"
    out = []
    if row["ffcv_img_s"] is None:
        out.append((f"MRL through FFCV >= {TARGET_IMG_S:.0f} img/s",
                    f"not evaluated (no FFCV rows; model only: {row['model_only_img_s']:.0f} img/s, an upper bound)"))
        r, src = row["model_only_ratio"], "model only"
    else:
        v = row["ffcv_img_s"]
        out.append((f"MRL through FFCV >= {TARGET_IMG_S:.0f} img/s", f"{v:.0f} img/s: {'PASS' if v >= TARGET_IMG_S else 'FAIL'}{setting}"))
        r, src = row["ffcv_ratio"], "FFCV"
    if r is None:
        out.append((f"MRL >= {TARGET_RATIO}x plain head", "not evaluated (no plain head run)"))
    else:
        out.append((f"MRL >= {TARGET_RATIO}x plain head", f"{r:.3f}x ({src}): {'PASS' if r >= TARGET_RATIO else 'FAIL'}{setting}"))
    return out


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", help="training crop sizes (default: 160 176 192 224; 32 48 with --smoke)")
    ap.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS), help="default: plain mrl mrl_e")
    ap.add_argument("--batch-size", type=int, help="images per step (default: 256; 16 with --smoke)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, per run (default: 10; 2 with --smoke)")
    ap.add_argument("--steps", type=int, help="timed steps per run (default: 40; 2 with --smoke)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone and the head (compiled again for every run)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="Trainer(benchmark=True) (cuDNN autotuning; the GPU configs set it)")
    ap.add_argument("--blurpool", action="store_true", help="BlurPool anti-aliasing, as in configs/imagenet/resnet_ffcv.yaml")
    ap.add_argument("--backbone", help="timm model (default: resnet50; test_resnet with --smoke)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--precision", help="Trainer precision (default: bf16-mixed; 32-true with --smoke)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="FFCV decoding threads and beton writers (default: cpu count)")
    ap.add_argument("--images", type=int, help="samples in the .beton (default: batch x (warmup + steps), one epoch)")
    ap.add_argument("--unique", type=int, help="distinct photo crops behind them (default: min(images, 2000))")
    ap.add_argument("--no-ffcv", action="store_true", help="only the model-only rows")
    ap.add_argument("--workdir", type=Path, help="where the temporary data folder goes (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the photos and the .beton")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results here (atomically)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="on the CPU, tiny model and data, 2 + 2 steps (a test of the script)")
    args = ap.parse_args()
    smoke = args.smoke
    args.sizes = args.sizes or ([32, 48] if smoke else [160, 176, 192, 224])
    args.batch_size = args.batch_size or (16 if smoke else 256)
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 10)
    args.steps = args.steps or (2 if smoke else 40)
    args.backbone = args.backbone or ("test_resnet" if smoke else "resnet50")
    args.precision = args.precision or ("32-true" if smoke else "bf16-mixed")
    args.images = args.images or args.batch_size * (args.warmup + args.steps)
    args.unique = min(args.unique or 2000, args.images)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    if smoke:
        args.device = "cpu"
        torch.set_num_threads(1)  # beside FFCV's threads on a small machine: no OpenMP spinning against them
    elif torch.cuda.is_available():
        args.device = "cuda"
    else:
        raise SystemExit("no CUDA GPU visible: this benchmark needs one (--smoke runs a CPU test of the script)")

    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    skip = ffcv_status(args.no_ffcv)
    print(f"{device}; torch {torch.__version__}, lightning {version('lightning')}, timm {version('timm')}, "
          f"ffcv {version('ffcv')}; {os.cpu_count()} CPUs")
    print(f"{args.backbone}, {args.classes} classes, batch {args.batch_size}, precision {args.precision}, channels_last, "
          f"compile {'on' if args.compile else 'off'}, cudnn.benchmark {'on' if args.cudnn_benchmark else 'default'}"
          f"{', BlurPool' if args.blurpool else ''}; {args.warmup} warm-up + {args.steps} timed steps per run")
    if skip:
        print(f"FFCV rows skipped: {skip}; running the model-only rows only")
    elif args.images < args.batch_size * (args.warmup + args.steps):
        print(f"note: {args.images} samples are fewer than the {args.warmup + args.steps} steps need: "
              "epoch boundaries fall inside the timing")

    parent = args.workdir
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="gpu_throughput_", dir=parent))
    results: dict[tuple[int, str, str], dict] = {}
    t_all = time.time()
    ffcv_dm = None
    try:
        if not skip:
            workers = max(1, min(args.workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else args.workers))
            print(f"data in {root}; FFCV workers {workers}")
            beton = write_photo_beton(root, max(args.sizes), args.images, args.unique, args.classes, args.workers, args.seed)
            ffcv_dm = ffcv_data_module(args, beton)
        paths = ["model only"] if skip else ["ffcv", "model only"]
        for i, size in enumerate(args.sizes):
            k = i % len(args.heads)
            order = args.heads[k:] + args.heads[:k]  # rotated: no head always runs first
            for data in paths:
                for head in order:
                    r = run_one(args, data, size, head, ffcv_dm if data == "ffcv" else None)
                    results[size, head, data] = r
                    print(f"  {size:>4} px  {head:<6} {data:<11}{r['img_s']:>9.0f} img/s   "
                          f"({r['images']} images in {r['seconds']:.2f} s; warm-up {r['warmup_s']:.1f} s)", flush=True)
    finally:
        del ffcv_dm  # its Loader's threads and buffers, before the file goes
        gc.collect()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    rows = []
    for size in args.sizes:
        for head in args.heads:
            f = results.get((size, head, "ffcv"), {}).get("img_s")
            m = results[size, head, "model only"]["img_s"]
            fp = results.get((size, "plain", "ffcv"), {}).get("img_s")
            mp = results.get((size, "plain", "model only"), {}).get("img_s")
            rows.append({
                "size": size, "head": head,
                "ffcv_img_s": f, "ffcv_ratio": ratio(f, fp),
                "model_only_img_s": m, "model_only_ratio": ratio(m, mp),
                "ffcv_over_model_only": ratio(f, m),
                "ffcv_warmup_s": results.get((size, head, "ffcv"), {}).get("warmup_s"),
                "model_only_warmup_s": results[size, head, "model only"]["warmup_s"],
            })

    print(f"\n== Training throughput, {args.backbone}, batch {args.batch_size}, {args.precision}, {device} ==")
    print(f"{'px':>4}  {'head':<7}{'FFCV img/s':>11}{'x plain':>9}{'model only img/s':>18}{'x plain':>9}{'FFCV / model only':>19}")
    for r in rows:
        print(f"{r['size']:>4}  {r['head']:<7}{fmt(r['ffcv_img_s'], '.0f'):>11}{fmt(r['ffcv_ratio'], '.3f'):>9}"
              f"{r['model_only_img_s']:>18.0f}{fmt(r['model_only_ratio'], '.3f'):>9}{fmt(r['ffcv_over_model_only'], '.3f'):>19}")
    if skip:
        print(f"(FFCV rows skipped: {skip})")
    checks = targets(rows, args, device)
    print(f"\ntargets at {TARGET_SIZE} px (issue 5):")
    for what, verdict in checks:
        print(f"  {what}: {verdict}")
    print(f"total {time.time() - t_all:.0f} s")

    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json(args.json, {
            "device": device, "torch": torch.__version__, "lightning": version("lightning"),
            "timm": version("timm"), "ffcv": version("ffcv"), "ffcv_skipped": skip,
            "settings": settings, "rows": rows,
            "targets": {what: verdict for what, verdict in checks},
            "timing": "img/s = images of the measured steps / their wall time (synchronised at both ends)",
        })
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
