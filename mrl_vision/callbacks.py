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
