"""Lightning callbacks of mrl-vision."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .files import atomic_write_text


class PredictionWriter(BasePredictionWriter):
    """Write ``mrl-vision predict`` results to ``predictions.csv`` in the run's log directory.

    One row per image: its index in the predict set, its label when the data has one, then the
    predicted class and max-softmax confidence at every nesting size. Under DDP each rank
    writes ``predictions.rank{R}.csv`` for its shard.

    Example (CLI)::

        mrl-vision predict --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir, self.filename = output_dir, filename
        self.path: Path | None = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        outputs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not outputs:
            return
        preds = torch.cat([o["preds"] for o in outputs]).cpu()
        conf = torch.cat([o["confidence"] for o in outputs]).cpu()
        target = torch.cat([o["target"] for o in outputs]).cpu() if "target" in outputs[0] else None
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        flat = [i for batch in indices for i in batch] if indices and indices[0] is not None else list(range(len(preds)))
        nesting = list(pl_module.nesting)
        header = ["index"] + (["target"] if target is not None else [])
        header += [f"pred@{m}" for m in nesting] + [f"conf@{m}" for m in nesting]
        lines = [",".join(header)]
        for r in range(len(preds)):
            row = [str(flat[r])] + ([str(int(target[r]))] if target is not None else [])
            row += [str(int(p)) for p in preds[r]] + [f"{float(c):.4f}" for c in conf[r]]
            lines.append(",".join(row))
        name = self.filename
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{ext}"
        out_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir
        self.path = Path(out_dir) / name
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        print(f"wrote {len(preds)} predictions to {self.path}")


def progressive_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    """Training resolution at ``epoch``: ``min_res`` up to ``start_ramp``, ``max_res`` from
    ``end_ramp``, linear in between rounded to a multiple of ``step`` (the reference recipe)."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    frac = (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round((min_res + frac * (max_res - min_res)) / step)) * step


class ProgressiveResizing(L.Callback):
    """Grow the training crop from ``min_res`` to ``max_res`` between ``start_ramp`` and
    ``end_ramp`` epochs (multiples of ``step``), as in the FFCV ImageNet recipe (160 -> 192 px
    between epochs 29 and 34 of 40).

    Works with any data module that has ``set_train_resolution(size)`` (``FFCVDataModule``
    changes its decoder's output size, effective from the next epoch's first batch).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mrl_vision.callbacks.ProgressiveResizing
              init_args: {min_res: 160, max_res: 192, start_ramp: 29, end_ramp: 34}
    """

    def __init__(self, min_res: int = 160, max_res: int = 192, start_ramp: int = 29, end_ramp: int = 34, step: int = 32) -> None:
        if not 0 < min_res <= max_res:
            raise ValueError(f"need 0 < min_res <= max_res, got min_res={min_res}, max_res={max_res}")
        if end_ramp <= start_ramp:
            raise ValueError(f"end_ramp ({end_ramp}) must be after start_ramp ({start_ramp})")
        if step < 1 or min_res % step or max_res % step:
            raise ValueError(f"min_res ({min_res}) and max_res ({max_res}) must be multiples of step ({step})")
        self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.step = min_res, max_res, start_ramp, end_ramp, step

    def resolution(self, epoch: int) -> int:
        return progressive_resolution(epoch, self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.step)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(trainer.datamodule, "set_train_resolution"):
            raise TypeError(
                f"ProgressiveResizing needs a data module with set_train_resolution(); "
                f"{type(trainer.datamodule).__name__} has none (use FFCVDataModule)"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        res = self.resolution(trainer.current_epoch)
        trainer.datamodule.set_train_resolution(res)
        pl_module.log("train/resolution", float(res), on_step=False, on_epoch=True)
