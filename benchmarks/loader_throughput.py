"""Training-loader throughput: the FFCV data module, the raw ffcv ``Loader``, torchvision and litdata, side by side.

Four loaders run the same training pipeline (RandomResizedCrop, horizontal flip, normalise to
float32) at the same crop size, batch size and number of workers, over the same images:

1. ``FFCVDataModule(train_path=...).train_dataloader()``, each batch passed through the module's
   ``on_after_batch_transfer``, standalone, without a Trainer (on the CPU the batches arrive
   normalised by FFCV's JIT ``NormalizeImage``); its crop and flip are the seeded ones (below);
2. a raw ``ffcv.loader.Loader`` built by hand with FFCV's own (unseeded) augmentations
   (RandomResizedCropRGBImageDecoder, RandomHorizontalFlip, NormalizeImage, ToTensor, ToTorchImage),
   the same order (RANDOM), ``os_cache`` and ``batches_ahead``;
3. torchvision ``ImageFolder`` + ``DataLoader`` (``mrl_vision.data.transforms.train_transform``:
   RandomResizedCrop + flip + ToDtype + Normalize in the workers), shuffled, persistent workers;
4. ``StreamingDataModule(train_path=...).train_dataloader()`` (litdata's ``StreamingDataLoader`` over the
   chunk folder ``mrl-vision prepare --format litdata`` writes, read from local disk: the images' own
   JPEG bytes, capped at the beton's ``max_resolution``), decoded, cropped, flipped and normalised by
   the same torchvision transforms in its workers, each batch through ``on_after_batch_transfer``.

The cost of seeding: a fifth row, ``raw Loader, seeded ops``, is the raw Loader of row 2 with the
seeded crop and flip of ``mrl_vision.data.ffcv_ops`` (drawn from seed, epoch and sample index; a
``SeededLoader``) in place of FFCV's, everything else equal; the summary prints seeded / FFCV's.

Each loader first runs warm-up epochs (FFCV's JIT compilation, worker start-up), then the timed
epochs, interleaved by epoch in an order rotated every round so machine noise hits them alike.
The figure is images per second, the median over the timed epochs; the ratios are data module /
raw Loader and data module / torchvision. A fourth row, the raw Loader handing over its ``uint8``
batches without the normalisation, shows how much of the FFCV time is the CPU normalisation (on a
GPU it runs on the device).

Without ``--source`` the images are generated from real photographs: the sample photos that ship
with scikit-image (no download), one class per photo, many seeded random crops per photo saved as
JPEG (quality 90); 256-500 px on the longer side for crop sizes >= 128 px, 36-40 px below. The
``.beton`` is written with ``write_beton``: ``proportion`` (half JPEG, half raw pixels, FFCV's
ImageNet recipe, at most 500 px) for large crops, ``raw`` for small ones.

    python benchmarks/loader_throughput.py                          # 32 px and 224 px (about 5 minutes on 2 cores)
    python benchmarks/loader_throughput.py --quick                  # a smoke run at 32 px (about 30 s)
    python benchmarks/loader_throughput.py --quick --sizes 32 224   # both settings, tiny (about a minute)
    python benchmarks/loader_throughput.py --source DIR --sizes 224 # your own DIR/<class>/*.jpg
    python benchmarks/loader_throughput.py --make-source DIR --sizes 224 --images 3000  # only write the photos

Targets (issue): data module >= 0.95x the raw Loader; >= 10x torchvision at 32 px, >= 4x at 224 px
(2 cores); seeded ops at no measurable cost against FFCV's own (ratio about 1, within epoch noise). The
litdata row has no target: it shows what streaming costs against FFCV on one machine's local disk
(streaming exists for the data and nodes FFCV cannot serve). Needs ffcv (``pip install 'mrl-vision[ffcv]'``),
litdata for its row (``pip install 'mrl-vision[streaming]'``; the row is left out without it) and, for
generated sources, scikit-image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# scikit-image sample photographs that ship in the wheel (no pooch download); class name -> loader name.
# Synthetic images (colorwheel, logo, checkerboard, phantoms, blobs) are left out.
PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "chelsea": "chelsea",
    "rocket": "rocket",
    "immunohistochemistry": "immunohistochemistry",
    "hubble_deep_field": "hubble_deep_field",
    "retina": "retina",
    "motorcycle_left": "stereo_motorcycle",
    "motorcycle_right": "stereo_motorcycle",
    "camera": "camera",
    "coins": "coins",
    "moon": "moon",
    "clock": "clock",
    "grass": "grass",
    "gravel": "gravel",
    "brick": "brick",
}


def load_photos() -> dict[str, np.ndarray]:
    """The photographs as uint8 RGB arrays (grey ones stacked to three channels)."""
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("generating a source needs scikit-image: pip install scikit-image (or pass --source DIR)")
    photos = {}
    for name, fn in PHOTOS.items():
        try:
            img = getattr(data, fn)()
        except Exception as e:  # a sample that needs a download (pooch) on this install: skip it
            print(f"  skipping skimage.data.{fn}: {type(e).__name__}")
            continue
        if fn == "stereo_motorcycle":
            img = img[0] if name.endswith("left") else img[1]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    if len(photos) < 2:
        raise SystemExit("fewer than 2 scikit-image sample photos load offline; pass --source DIR")
    return photos


def side_range(crop: int) -> tuple[int, int]:
    """Longer side of the generated images: ImageNet-like for large crops, CIFAR-like for small."""
    return (256, 500) if crop >= 128 else (crop + 4, crop + 8)


def make_source(root: Path, crop: int, num_images: int, seed: int = 0) -> None:
    """Write ``num_images`` random crops of the photos to ``root/<photo>/NNNNNN.jpg`` (JPEG quality 90)."""
    from PIL import Image

    marker = root / "source.json"
    spec = {"crop": crop, "images": num_images, "seed": seed, "sides": side_range(crop)}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"  reusing {root}")
        return
    if root.exists():
        shutil.rmtree(root)
    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    lo, hi = side_range(crop)
    t0 = time.time()
    for name in names:
        (root / name).mkdir(parents=True)
    for i in range(num_images):
        name = names[i % len(names)]
        img = photos[name]
        H, W = img.shape[:2]
        area = rng.uniform(0.2, 1.0) * H * W
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w = int(min(W, max(16, round((area * aspect) ** 0.5))))
        h = int(min(H, max(16, round((area / aspect) ** 0.5))))
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        longer = int(rng.integers(lo, hi + 1))
        if crop >= 128:
            longer = min(longer, max(max(h, w), lo))  # do not upsample a small crop beyond the lower bound
        scale = longer / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        Image.fromarray(img[y : y + h, x : x + w]).resize(size, Image.BICUBIC).save(
            root / name / f"{i:06d}.jpg", quality=90
        )
    marker.write_text(json.dumps(spec) + "\n")
    print(f"  wrote {num_images} JPEG crops of {len(names)} photos to {root} in {time.time() - t0:.1f} s")


def describe_source(root: Path) -> str:
    from PIL import Image

    from mrl_vision.data.imagefolder import scan_split

    classes, samples = scan_split(root)
    step = max(1, len(samples) // 2000)  # sizes from at most ~2000 headers
    sizes = []
    for path, _ in samples[::step]:
        with Image.open(path) as im:
            sizes.append(im.size)
    w, h = np.mean(sizes, axis=0)
    kb = np.mean([os.path.getsize(p) for p, _ in samples[::step]]) / 1024
    return f"{len(samples)} images, {len(classes)} classes, mean {w:.0f} x {h:.0f} px, mean file {kb:.1f} KiB"


# ----------------------------------------------------------------------------- the loaders
def module_epochs(dm):
    """One training pass of data module ``dm`` per call (each batch through its ``on_after_batch_transfer``),
    returning the images it gave."""
    loader = dm.train_dataloader()

    def epoch() -> int:
        n = 0
        for batch_ in loader:
            images, _labels = dm.on_after_batch_transfer(batch_, 0)
            n += images.shape[0]
        return n

    return epoch


def ffcv_module_epochs(path: str, crop: int, batch: int, workers: int, seed: int):
    from mrl_vision.data.ffcv_loader import FFCVDataModule

    return module_epochs(FFCVDataModule(train_path=path, image_size=crop, batch_size=batch, num_workers=workers, seed=seed))


def ffcv_raw_epochs(path: str, crop: int, batch: int, workers: int, seed: int, normalize: bool = True,
                    seeded: bool = False):
    """A hand-built ffcv Loader with the data module's CPU pipeline (normalised by FFCV's JIT
    ``NormalizeImage`` in the loader threads), or with ``normalize=False`` its uint8 output; FFCV's
    own RandomResizedCrop and flip, or with ``seeded=True`` the seeded ones of ``ffcv_ops``."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    from mrl_vision.data.ffcv_ops import SeededLoader, SeededRandomHorizontalFlip, SeededRandomResizedCropRGBImageDecoder
    from mrl_vision.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    # every JIT op first, then the torch ones (alternating them hangs FFCV on the CPU)
    if seeded:
        image = [
            SeededRandomResizedCropRGBImageDecoder((crop, crop), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=seed),
            SeededRandomHorizontalFlip(seed=seed),
        ]
    else:
        image = [
            RandomResizedCropRGBImageDecoder((crop, crop), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            RandomHorizontalFlip(),
        ]
    if normalize:
        image.append(NormalizeImage(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255, np.float32))
    image += [ToTensor(), ToTorchImage(channels_last=True)]
    loader = (SeededLoader if seeded else Loader)(
        path,
        batch_size=batch,
        num_workers=workers,
        os_cache=True,
        order=OrderOption.RANDOM,
        seed=seed,
        drop_last=True,
        batches_ahead=3,
        pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze(1)]},
    )

    def epoch() -> int:
        n = 0
        for images, labels in loader:
            labels = labels.clone()  # as the data module does
            n += images.shape[0]
        return n

    return epoch


def torchvision_epochs(root: str, crop: int, batch: int, workers: int, seed: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from mrl_vision.data.transforms import train_transform

    torch.manual_seed(seed)
    loader = DataLoader(
        ImageFolder(root, transform=train_transform(crop)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def epoch() -> int:
        n = 0
        for images, _labels in loader:
            n += images.shape[0]
        return n

    return epoch


def litdata_module_epochs(path: str, crop: int, batch: int, workers: int, seed: int):
    from mrl_vision.data import StreamingDataModule

    return module_epochs(StreamingDataModule(train_path=path, image_size=crop, batch_size=batch, num_workers=workers,
                                             seed=seed, drop_last=True))


LITDATA = "litdata stream module"

LOADERS = {
    "FFCV data module": ffcv_module_epochs,
    "raw ffcv Loader": ffcv_raw_epochs,
    "torchvision": torchvision_epochs,
    "raw Loader, uint8 out": lambda *a: ffcv_raw_epochs(*a, normalize=False),
    "raw Loader, seeded ops": lambda *a: ffcv_raw_epochs(*a, seeded=True),
}


SEEDED_AB = ("raw ffcv Loader", "raw Loader, seeded ops")  # FFCV's own crop + flip, the seeded ones


def measure(source: Path, beton: str, crop: int, batch: int, workers: int, warmup: int, epochs: int, seed: int,
            ab_rounds: int = 0, chunks: str | None = None):
    """Per loader: images per second of each timed epoch, and the warm-up epochs' seconds; then
    ``ab_rounds`` rounds of only the two loaders of ``SEEDED_AB``, back to back in alternating order
    (ABBA), whose per-round ratios (seeded / FFCV's own) are returned under ``"ab"``."""
    runs = {}
    for name, build in LOADERS.items():
        runs[name] = build(str(source) if name == "torchvision" else beton, crop, batch, workers, seed)
    if chunks is not None:
        runs[LITDATA] = litdata_module_epochs(chunks, crop, batch, workers, seed)
    names = list(runs)
    warm: dict[str, list[float]] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + epochs):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no loader always runs first
            t0 = time.perf_counter()
            n = runs[name]()
            dt = time.perf_counter() - t0
            if n == 0:
                raise SystemExit(f"{name}: no full batch of {batch} in the source; lower --batch")
            (warm if r < warmup else rates)[name].append(n / dt if r >= warmup else dt)
    ab: list[float] = []
    for r in range(ab_rounds):
        pair = SEEDED_AB if r % 2 == 0 else SEEDED_AB[::-1]
        rate = {}
        for name in pair:
            t0 = time.perf_counter()
            n = runs[name]()
            rate[name] = n / (time.perf_counter() - t0)
        ab.append(rate[SEEDED_AB[1]] / rate[SEEDED_AB[0]])
    rates["ab"] = ab
    return rates, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="an image folder tree DIR/<class>/*.jpg (default: generated photos)")
    ap.add_argument("--make-source", type=Path, metavar="DIR", help="only write the generated photos for the first of --sizes to DIR")
    ap.add_argument("--sizes", type=int, nargs="+", help="training crop sizes (default: 32 224; 32 with --quick)")
    ap.add_argument("--images", type=int, help="generated images per size (default: 16000 at < 128 px, 2400 above)")
    ap.add_argument("--batch", type=int, help="batch size (default: 256 at < 128 px, 64 above)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="FFCV threads / DataLoader workers (default: cpu count)")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per loader (default: 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs per loader first (default: 1)")
    ap.add_argument("--write-mode", choices=["raw", "jpg", "proportion", "smart"], help="beton image storage (default: proportion at >= 128 px, raw below)")
    ap.add_argument("--max-resolution", type=int, help="beton cap on the longer side (default: 500 at >= 128 px, none below)")
    ap.add_argument("--workdir", type=Path, help="keep the generated photos and .beton files here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ab-rounds", type=int, default=12,
                    help="extra back-to-back rounds of FFCV's own vs the seeded crop + flip only (default: 12; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sources, 1 timed epoch (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.epochs = 1
        args.ab_rounds = min(args.ab_rounds, 2)
    if args.sizes is None:
        args.sizes = [32] if args.quick else [32, 224]

    def images_for(crop: int) -> int:
        if args.images:
            return args.images
        if args.quick:
            return 1024 if crop < 128 else 256
        return 16000 if crop < 128 else 2400

    if args.make_source:
        make_source(args.make_source, args.sizes[0], images_for(args.sizes[0]), args.seed)
        print(describe_source(args.make_source))
        return

    from mrl_vision.data.beton import require_ffcv, write_beton

    require_ffcv()
    import importlib.metadata

    try:
        from mrl_vision.data.chunks import require_litdata, write_chunks

        require_litdata()
        have_litdata = True
    except ImportError:
        have_litdata = False

    import torchvision

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loader_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    print(
        f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"ffcv {importlib.metadata.version('ffcv')}, "
        f"litdata {importlib.metadata.version('litdata') if have_litdata else 'not installed'}, CPU only (no GPU used)"
    )
    print(f"workers {args.workers}, warm-up epochs {args.warmup}, timed epochs {args.epochs} (median reported), "
          f"loaders interleaved by epoch; workdir {workdir}{'' if args.workdir else ' (temporary)'}")
    results = []
    try:
        for crop in args.sizes:
            batch = args.batch or (256 if crop < 128 else 64)
            mode = args.write_mode or ("proportion" if crop >= 128 else "raw")
            max_res = args.max_resolution or (500 if crop >= 128 else None)
            print(f"\n== {crop} px crops, batch {batch} ==")
            if args.source:
                source = args.source
            else:
                source = workdir / f"photos_{crop}px"
                make_source(source, crop, images_for(crop), args.seed)
            print(f"source {source}: {describe_source(source)}")
            beton = workdir / f"train_{crop}px.beton"
            t0 = time.time()
            info = write_beton(str(source), beton, write_mode=mode, max_resolution=max_res,
                               compress_probability=0.5, jpeg_quality=90, overwrite=True)
            print(f"beton {beton.name}: write_mode={mode}"
                  + (", compress_probability=0.5, jpeg_quality=90" if mode in ("proportion", "smart") else "")
                  + (", jpeg_quality=90" if mode == "jpg" else "")
                  + f", max_resolution={max_res}, {info['file_size'] / 2**20:.1f} MiB, written in {time.time() - t0:.1f} s")
            chunks = None
            if have_litdata:
                chunks = workdir / f"litdata_{crop}px"
                t0 = time.time()
                lit = write_chunks(str(source), chunks, max_resolution=max_res, jpeg_quality=90, overwrite=True)
                print(f"litdata {chunks.name}: the images' own bytes, max_resolution={max_res} (larger ones re-encoded, "
                      f"JPEG 90), {lit['data_bytes'] / 2**20:.1f} MiB, written in {time.time() - t0:.1f} s")
            rates, warm = measure(source, str(beton), crop, batch, args.workers, args.warmup, args.epochs, args.seed,
                                  args.ab_rounds, None if chunks is None else str(chunks))
            ab = rates.pop("ab")
            med = {n: statistics.median(r) for n, r in rates.items()}
            print(f"{'loader':<24}{'img/s':>9}{'min':>9}{'max':>9}{'warm-up s':>11}{'x raw Loader':>14}{'x torchvision':>15}")
            for n in rates:
                print(f"{n:<24}{med[n]:>9.0f}{min(rates[n]):>9.0f}{max(rates[n]):>9.0f}{sum(warm[n]):>11.1f}"
                      f"{med[n] / med['raw ffcv Loader']:>14.3f}{med[n] / med['torchvision']:>15.2f}")
            seeded, ffcv_own = rates[SEEDED_AB[1]], rates[SEEDED_AB[0]]
            print(f"seeded crop + flip vs FFCV's own: {med[SEEDED_AB[1]]:.0f} vs {med[SEEDED_AB[0]]:.0f} img/s, "
                  f"ratio {med[SEEDED_AB[1]] / med[SEEDED_AB[0]]:.3f} (per timed round: "
                  + ", ".join(f"{a / b:.3f}" for a, b in zip(seeded, ffcv_own)) + ")")
            if ab:
                q1, q2, q3 = statistics.quantiles(ab, n=4) if len(ab) > 1 else (ab[0],) * 3
                print(f"A/B, {len(ab)} back-to-back rounds of only these two (alternating order): seeded / FFCV's own "
                      f"median {statistics.median(ab):.3f}, quartiles {q1:.3f}-{q3:.3f}, "
                      f"rounds faster {sum(r > 1 for r in ab)}/{len(ab)}")
            results.append((crop, batch, med, statistics.median(ab) if ab else None))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n== Summary: data module throughput ratios (targets on 2 cores) ==")
    for crop, batch, med, ab in results:
        vs_raw = med["FFCV data module"] / med["raw ffcv Loader"]
        vs_tv = med["FFCV data module"] / med["torchvision"]
        tv_target = 10.0 if crop < 128 else 4.0
        seeded = ab if ab is not None else med[SEEDED_AB[1]] / med[SEEDED_AB[0]]
        print(f"{crop:>4} px, batch {batch:>3}: {vs_raw:.3f}x raw Loader (target >= 0.95: {'met' if vs_raw >= 0.95 else 'NOT met'}), "
              f"{vs_tv:.2f}x torchvision (target >= {tv_target:g}: {'met' if vs_tv >= tv_target else 'NOT met'}); "
              f"seeded crop + flip {seeded:.3f}x FFCV's own ({'A/B median' if ab is not None else 'medians'})")
        if LITDATA in med:
            print(f"{'':>16}litdata streaming (local disk): {med[LITDATA]:.0f} img/s, "
                  f"{med[LITDATA] / med['FFCV data module']:.3f}x the FFCV data module, {med[LITDATA] / med['torchvision']:.2f}x torchvision")


if __name__ == "__main__":
    main()
