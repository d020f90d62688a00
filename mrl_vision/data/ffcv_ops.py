"""Seeded FFCV augmentations: RandomResizedCrop and horizontal flip drawn from (seed, epoch, sample index).

FFCV's own ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's
internal random state, one per loader thread, which no Python-side seed reaches: two runs of the
same seeded training see different crops. Here every random number is a pure function of
``(seed, epoch, sample index)``:

* a counter-based generator: the splitmix64 finaliser (a bijection of 64-bit integers with good
  avalanche) absorbs ``seed`` then ``epoch`` (in Python, once per epoch: the *epoch key*) and then
  the sample's index in the ``.beton`` file (in the compiled code: the *sample key*); the k-th
  uniform number of a sample is the top 53 bits of ``mix(sample_key + (k + 1) * golden_gamma)``;
* the crop and the flip use different salts, so their draws are independent;
* nothing depends on which thread decodes a sample, on the batch it lands in, or on the number of
  threads: the same seed, epoch and index always give the same crop and flip.

RandomResizedCrop keeps torchvision's (and FFCV's) semantics: up to 10 attempts, each drawing an
area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, accepting the first crop
that fits, at a uniform position; otherwise the central crop with the aspect ratio clamped into
``ratio``. Sides are rounded half up (``floor(x + 0.5)``; torchvision rounds half to even, which
differs only on exact ties). Draw k = 4t + {0, 1, 2, 3} of attempt t gives its area, aspect, row
and column; the flip is draw 0 of its own stream.

How the epoch reaches the compiled code: numba freezes global and closure arrays as constants at
compilation, so each operation owns a one-element ``uint64`` array holding the current epoch key
and its compiled code reads it through the array's address (a ``carray`` over a pointer made from
an integer constant), so a new value written from Python is seen by the already compiled code, with
no recompilation. ``SeededLoader`` (an FFCV ``Loader``) writes ``epoch_key(seed, epoch)`` into every
seeded operation of its pipelines at each ``iter()``, with the epoch of FFCV's own counter
(``next_epoch``), the one its ``RANDOM`` order uses (``seed + epoch``); set ``next_epoch`` to start
at another epoch (a resumed run). The epoch key is written before FFCV's epoch thread starts, so
every batch of an epoch sees it.

The pure-Python functions (``mix64``, ``epoch_key``, ``sample_key``, ``uniform``, ``random_crop``,
``flip_decision``) are the reference of their numba twins (``_nb_*``): tests compare the two.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

__all__ = [
    "SeededLoader",
    "SeededOperation",
    "SeededRandomHorizontalFlip",
    "SeededRandomResizedCropRGBImageDecoder",
    "epoch_key",
    "flip_decision",
    "mix64",
    "random_crop",
    "sample_key",
    "seeded_operations",
    "uniform",
]

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
CROP_SALT = 0x52524320_43524F50  # "RRC CROP"
FLIP_SALT = 0x48464C49_50464C50  # "HFLIPFLP"
ATTEMPTS = 10
TWO_M53 = 2.0 ** -53


# ----------------------------------------------------------------------------- pure-Python reference
def mix64(z: int) -> int:
    """The splitmix64 finaliser of a 64-bit integer."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK64
    return z ^ (z >> 31)


def _absorb(h: int, x: int) -> int:
    return mix64(h + ((x & MASK64) + 1) * GOLDEN_GAMMA)


def epoch_key(seed: int, epoch: int, salt: int) -> int:
    """The key of one operation (``salt``) in one epoch of one seeded run."""
    return _absorb(_absorb(mix64(salt), seed), epoch)


def sample_key(key: int, index: int) -> int:
    """The key of one sample (its index in the file) under an epoch key."""
    return _absorb(key, index)


def uniform(key: int, k: int) -> float:
    """The ``k``-th uniform number in [0, 1) of the stream ``key`` (53 random bits)."""
    return (mix64(key + (k + 1) * GOLDEN_GAMMA) >> 11) * TWO_M53


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def crop_constants(scale: Sequence[float], ratio: Sequence[float]) -> tuple[float, float, float, float, float, float]:
    """``(scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, ratio_min, ratio_max)``: what the crop draw reads."""
    s0, s1 = float(scale[0]), float(scale[1])
    r0, r1 = float(ratio[0]), float(ratio[1])
    if not (0.0 < s0 <= s1):
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {tuple(scale)}")
    if not (0.0 < r0 <= r1):
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {tuple(ratio)}")
    return s0, s1, math.log(r0), math.log(r1), r0, r1


def _random_crop_from_key(height: int, width: int, c: tuple, key: int) -> tuple[int, int, int, int]:
    s0, s1, lr0, lr1, rmin, rmax = c
    area = float(height * width)
    for t in range(ATTEMPTS):
        target = area * (s0 + (s1 - s0) * uniform(key, 4 * t))
        aspect = math.exp(lr0 + (lr1 - lr0) * uniform(key, 4 * t + 1))
        w = _round_half_up(math.sqrt(target * aspect))
        h = _round_half_up(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(math.floor(uniform(key, 4 * t + 2) * (height - h + 1)))
            j = int(math.floor(uniform(key, 4 * t + 3) * (width - w + 1)))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < rmin:
        w, h = width, _round_half_up(width / rmin)
    elif in_ratio > rmax:
        h, w = height, _round_half_up(height * rmax)
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                seed: int, epoch: int, index: int) -> tuple[int, int, int, int]:
    """The crop ``(row, col, h, w)`` of sample ``index`` (image ``height x width``) in ``epoch`` of run ``seed``."""
    key = sample_key(epoch_key(seed, epoch, CROP_SALT), index)
    return _random_crop_from_key(int(height), int(width), crop_constants(scale, ratio), key)


def flip_decision(seed: int, epoch: int, index: int, prob: float = 0.5) -> bool:
    """Whether sample ``index`` is mirrored in ``epoch`` of run ``seed``."""
    return uniform(sample_key(epoch_key(seed, epoch, FLIP_SALT), index), 0) < prob


# ----------------------------------------------------------------------------- numba twins
_U = np.uint64
_NB = dict(nogil=True, cache=False)  # no fastmath: the same IEEE arithmetic as the reference


@numba.njit(**_NB)
def _nb_mix64(z):
    z = (z ^ (z >> _U(30))) * _U(MIX_1)
    z = (z ^ (z >> _U(27))) * _U(MIX_2)
    return z ^ (z >> _U(31))


@numba.njit(**_NB)
def _nb_sample_key(key, index):
    return _nb_mix64(_U(key) + (_U(index) + _U(1)) * _U(GOLDEN_GAMMA))


@numba.njit(**_NB)
def _nb_uniform(key, k):
    bits = _nb_mix64(_U(key) + (_U(k) + _U(1)) * _U(GOLDEN_GAMMA)) >> _U(11)
    return np.float64(bits) * TWO_M53


@numba.njit(**_NB)
def _nb_random_crop(height, width, s0, s1, lr0, lr1, rmin, rmax, key):
    height = np.int64(height)
    width = np.int64(width)
    area = np.float64(height * width)
    for t in range(ATTEMPTS):
        target = area * (s0 + (s1 - s0) * _nb_uniform(key, 4 * t))
        aspect = math.exp(lr0 + (lr1 - lr0) * _nb_uniform(key, 4 * t + 1))
        w = np.int64(math.floor(math.sqrt(target * aspect) + 0.5))
        h = np.int64(math.floor(math.sqrt(target / aspect) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            i = np.int64(math.floor(_nb_uniform(key, 4 * t + 2) * np.float64(height - h + 1)))
            j = np.int64(math.floor(_nb_uniform(key, 4 * t + 3) * np.float64(width - w + 1)))
            return i, j, h, w
    in_ratio = np.float64(width) / np.float64(height)
    if in_ratio < rmin:
        w = width
        h = np.int64(math.floor(np.float64(width) / rmin + 0.5))
    elif in_ratio > rmax:
        h = height
        w = np.int64(math.floor(np.float64(height) * rmax + 0.5))
    else:
        h = height
        w = width
    return (height - h) // 2, (width - w) // 2, h, w


@intrinsic
def _address_as_pointer(typingctx, address):
    """An integer address as a ``void*`` (for ``numba.carray``)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@numba.njit(**_NB)
def _nb_load_u64(address):
    """The ``uint64`` at ``address``, read when called (not frozen at compilation)."""
    return numba.carray(_address_as_pointer(address), (1,), np.uint64)[0]


# ----------------------------------------------------------------------------- operations
class SeededOperation:
    """Mix-in of the seeded operations: a seed, a salt, and the live epoch key the compiled code reads."""

    salt: int = 0

    def _init_seeded(self, seed: int) -> None:
        # owned by the operation for its lifetime: the compiled code holds this array's address
        self._epoch_key = np.zeros(1, dtype=np.uint64)
        self.seed = int(seed)
        self.epoch = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the next batches from ``epoch`` (seen by the compiled code without recompiling)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self._epoch_key[0] = epoch_key(self.seed, self.epoch, self.salt)

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.set_epoch(self.epoch)

    def _key_reader(self) -> tuple[Callable, int]:
        """``(load, address)``: ``load(address)`` is the current epoch key inside the compiled code."""
        if Compiler.is_enabled:
            return _nb_load_u64, int(self._epoch_key.ctypes.data)
        holder = self._epoch_key  # FFCV's compiler disabled (pure Python): read the array itself
        return (lambda _address: int(holder[0])), 0


def _draw_functions() -> tuple[Callable, Callable, Callable]:
    """``(sample_key, uniform, crop)`` for the generated code: the numba twins, or the Python
    reference when FFCV's compiler is disabled (its operations then run as Python)."""
    if Compiler.is_enabled:
        return _nb_sample_key, _nb_uniform, _nb_random_crop

    def crop(height, width, s0, s1, lr0, lr1, rmin, rmax, key):
        return _random_crop_from_key(int(height), int(width), (s0, s1, lr0, lr1, rmin, rmax), key)

    return (lambda key, index: sample_key(int(key), int(index))), uniform, crop


class SeededRandomResizedCropRGBImageDecoder(SeededOperation, ResizedCropRGBImageDecoder):
    """RandomResizedCrop decoder of an ``RGBImageField`` whose crops are a function of (seed, epoch, index).

    A drop-in for FFCV's ``RandomResizedCropRGBImageDecoder`` (same arguments plus ``seed``;
    ``output_size`` may change between epochs, as ``ProgressiveResizing`` does). The epoch is set
    by ``SeededLoader`` (or ``set_epoch``).
    """

    salt = CROP_SALT

    def __init__(self, output_size: tuple[int, int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), seed: int = 0) -> None:
        super().__init__(output_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        crop_constants(self.scale, self.ratio)  # fail early on bad ranges
        self._init_seeded(seed)

    @property
    def get_crop_generator(self):  # FFCV's abstract hook; the draw here is _nb_random_crop
        return _nb_random_crop

    def generate_code(self) -> Callable:
        read_image = self.memory_read
        loop = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        resize = Compiler.compile(resize_crop)
        key_of, _, draw = _draw_functions()
        load, address = self._key_reader()
        s0, s1, lr0, lr1, rmin, rmax = crop_constants(self.scale, self.ratio)
        jpg = IMAGE_MODES["jpg"]

        def seeded_rrc(batch_indices, buffers, metadata, storage_state):
            out, scratch = buffers
            key = load(address)
            for slot in loop(len(batch_indices)):
                index = batch_indices[slot]
                entry = metadata[index]
                data = read_image(entry["data_ptr"], storage_state)
                height = np.int64(entry["height"])
                width = np.int64(entry["width"])
                if entry["mode"] == jpg:
                    flat = scratch[slot]
                    decode_jpeg(data, flat, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = flat.reshape(-1)[: height * width * 3].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                i, j, h, w = draw(height, width, s0, s1, lr0, lr1, rmin, rmax, key_of(key, index))
                resize(image, i, i + h, j, j + w, out[slot])
            return out[: len(batch_indices)]

        seeded_rrc.is_parallel = True
        return seeded_rrc


class SeededRandomHorizontalFlip(SeededOperation, Operation):
    """Horizontal flip of ``uint8 [N, H, W, C]`` images with probability ``flip_prob``, decided by (seed, epoch, index).

    Receives the batch's sample indices from FFCV (``with_indices``); the epoch is set by
    ``SeededLoader`` (or ``set_epoch``). Place it among the JIT operations (before ``ToTensor``).
    """

    salt = FLIP_SALT

    def __init__(self, flip_prob: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        self._init_seeded(seed)

    def generate_code(self) -> Callable:
        loop = Compiler.get_iterator()
        prob = self.flip_prob
        key_of, u, _ = _draw_functions()
        load, address = self._key_reader()

        def seeded_flip(images, out, indices):
            key = load(address)
            for slot in loop(images.shape[0]):
                if u(key_of(key, indices[slot]), 0) < prob:
                    out[slot] = images[slot, :, ::-1]
                else:
                    out[slot] = images[slot]
            return out

        seeded_flip.is_parallel = True
        seeded_flip.with_indices = True  # FFCV passes batch_indices after the output buffer
        return seeded_flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


# ----------------------------------------------------------------------------- the loader
def seeded_operations(pipelines: Iterable) -> list[SeededOperation]:
    """The seeded operations of FFCV pipeline specs (``Loader.pipeline_specs.values()``)."""
    found = []
    for spec in pipelines:
        for op in [spec.decoder, *spec.transforms]:
            if isinstance(op, SeededOperation) and op not in found:
                found.append(op)
    return found


class SeededLoader(Loader):
    """An FFCV ``Loader`` that sets the epoch of its seeded operations at every ``iter()``.

    The epoch is FFCV's own counter (``next_epoch``, which its ``RANDOM`` order reads as
    ``seed + epoch``), so epoch ``k`` of two loaders with the same seed gives the same batches,
    whatever the number of threads. Set ``next_epoch`` before ``iter()`` to start elsewhere.
    """

    def seeded_operations(self) -> list[SeededOperation]:
        return seeded_operations(self.pipeline_specs.values())

    def __iter__(self):
        for op in self.seeded_operations():
            op.set_epoch(self.next_epoch)
        return super().__iter__()
