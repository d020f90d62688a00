"""Random-number generator states in checkpoints, so that a resumed run draws what an uninterrupted one draws.

Lightning's checkpoints hold the weights, the optimizer, the schedulers and the loops, but not the
global RNG states. A run resumed with ``fit --ckpt_path last`` therefore shuffles and augments its
next epoch from the state that ``seed_everything`` and model construction left, not from the state
the interrupted run had reached: the same seed, a different run. :class:`RNGStateCheckpoint` saves
the states in every checkpoint and puts them back when training resumes from one.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def collect_rng_states(device: torch.device | str | None = None) -> dict[str, Any]:
    """The global RNG states: ``torch`` (CPU), ``torch.cuda`` (of ``device``, when it is a CUDA
    device), ``numpy`` (the legacy global ``np.random`` state) and ``python`` (``random``).

    Everything is a tensor or a plain number, so the checkpoint still loads with
    ``torch.load(..., weights_only=True)``.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Put back the states of :func:`collect_rng_states` (those it holds; the CUDA state only onto a
    CUDA ``device``)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "numpy" in states:
        s = states["numpy"]
        np.random.set_state((s["kind"], s["key"].numpy().astype(np.uint32), int(s["pos"]), int(s["has_gauss"]),
                             float(s["cached_gaussian"])))
    if "python" in states:
        s = states["python"]
        random.setstate((int(s["version"]), tuple(int(v) for v in s["state"].tolist()), s["gauss_next"]))
    device = torch.device(device) if device is not None else None
    if "torch.cuda" in states and device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch.cuda"].cpu(), device)


class RNGStateCheckpoint(L.Callback):
    """Save the global RNG states in every checkpoint and restore them when training resumes from one.

    Saved: torch's CPU generator, the CUDA generator of this process's device (when it trains on a
    GPU), numpy's global ``np.random`` state and Python's ``random`` state, as they are when the
    checkpoint is written. The configs' ``ModelCheckpoint`` writes at the end of a training epoch
    (``on_train_epoch_end``, after that epoch's validation); from there to the next epoch's first
    draw (the training DataLoader's ``iter()``, which takes a base seed, then its ``RandomSampler``
    seed, then the augmentations) the uninterrupted run draws nothing. The resumed run gets the
    states back while Lightning restores the checkpoint (``load_state_dict``, before the training
    loader's ``iter()``; its sanity check, if any, runs under ``isolate_rng``), so it draws the same
    shuffle and augmentations for its first epoch, and so on: with ``deterministic`` mode on the CPU
    the resumed run's weights and metrics equal the uninterrupted run's bit for bit.

    Limits:

    - a checkpoint written mid-epoch (``every_n_train_steps``) restores the states of that moment,
      but Lightning restarts a non-resumable DataLoader at the epoch's start: not exact;
    - DataLoader workers hold their own states: with ``num_workers > 0`` and persistent workers
      (the data modules' default when they have workers) the workers of the resumed run are
      seeded anew, so their augmentations differ from the uninterrupted run's; ``num_workers=0``
      or non-persistent workers (seeded from the restored main-process state at each epoch) are exact;
    - under DDP rank 0's states are saved and every rank gets them back: exact while the ranks'
      states agree (``seed_everything`` seeds every rank alike, and they stay alike while every rank
      draws as many numbers, e.g. crops of images of one size); otherwise the other ranks continue
      from rank 0's states, not their own;
    - a hook that draws random numbers in ``on_fit_start``/``on_train_start``/``on_train_epoch_start``
      draws them in a different order in the resumed run;
    - numpy ``Generator`` objects (``np.random.default_rng``) and FFCV's loaders keep their own states.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mrl_vision.rng.RNGStateCheckpoint

    or ``--trainer.callbacks+=mrl_vision.rng.RNGStateCheckpoint`` on the command line.
    """

    def __init__(self) -> None:
        self._device: torch.device | None = None
        self.restored = False  # whether states were put back from a checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Called before Lightning restores a checkpoint: the device whose CUDA generator is ours.
        self._device = trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states(self._device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict, self._device)
        self.restored = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and not self.restored:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{trainer.ckpt_path} holds no RNG states (written without RNGStateCheckpoint): this "
                           "run shuffles and augments from other random numbers than an uninterrupted run would")
