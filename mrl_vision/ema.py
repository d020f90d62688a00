"""``EMA``: an exponential moving average of the weights, on Lightning's ``WeightAveraging`` callback.

What Lightning's callback does (kept): after every optimizer step the average is updated (parameters and
buffers, so BatchNorm statistics are averaged too); validation runs on the averaged weights (so every
per-size metric, the cascade and ``KNNMonitor`` see them); a checkpoint's ``state_dict`` holds the averaged
weights and ``current_model_state`` the live ones, which a resumed fit restores; at the end of fit the
model takes the averaged weights.

What this adds for Matryoshka models:

* a warm-up of the decay, ``min(decay, (1 + n) / (10 + n))`` after n updates (TensorFlow's
  ``ExponentialMovingAverage(num_updates=...)`` rule), so a short run's average is not dominated by its
  random initialisation;
* the cascade's ``model.adaptive_thresholds`` are not weights: they are never averaged or swapped, so the
  thresholds fitted on the averaged model's validation logits stay in the model and reach the checkpoint's
  ``state_dict`` (Lightning's callback would average them with the live model's unfitted NaN);
* the checkpoint records ``checkpoint["ema"] = {"decay": ..., "updates": ...}``, and
  :meth:`mrl_vision.model.MatryoshkaModel.from_checkpoint` (``truncate``, ``embed``, ``export``) says that it
  loads the averaged weights (``weights="live"`` reads the live ones).

Example (YAML)::

    trainer:
      callbacks:
        - class_path: mrl_vision.callbacks.EMA
          init_args: {decay: 0.9998}
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info

NOT_AVERAGED = ("adaptive_thresholds",)
"""Buffer names (last component) that are fitted results, not weights: neither averaged nor swapped."""


class WarmupEMA:
    """The averaging function (``AveragedModel``'s ``multi_avg_fn``, one call per device and dtype group):
    ``ema <- d * ema + (1 - d) * current`` with ``d = rate(n)``: ``min(decay, (1 + n) / (10 + n))`` after n updates
    with warm-up, ``decay`` without. ``updates`` is kept on the host (no device sync per step); integer buffers
    (BatchNorm's ``num_batches_tracked``) follow the model."""

    def __init__(self, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0

    def rate(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any = None) -> None:
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self.rate(self.updates))
        else:
            torch._foreach_copy_(averaged, current)


class EMA(WeightAveraging):
    """Exponential moving average of the weights (see the module docstring).

    Args:
        decay: the average's decay per update (timm's ImageNet recipes: 0.9998; short runs: 0.999 or lower).
        warmup: the decay warm-up ``min(decay, (1 + n) / (10 + n))`` after n updates.
        every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step (0-based) that updates the average.
        device: where the average lives (default: the model's device; ``"cpu"`` saves accelerator memory).
    """

    def __init__(self, decay: float = 0.9998, warmup: bool = True, every_n_steps: int = 1, start_step: int = 0,
                 device: str | None = None) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps!r}")
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step!r}")
        self.averaging = WarmupEMA(decay, warmup)
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self.averaging)
        self.every_n_steps, self.start_step = int(every_n_steps), int(start_step)

    @property
    def decay(self) -> float:
        return self.averaging.decay

    @property
    def warmup(self) -> bool:
        return self.averaging.warmup

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and (step_idx - self.start_step) % self.every_n_steps == 0

    # -- what is swapped: parameters and buffers, by name, but not the fitted results
    def _pairs(self, pl_module: L.LightningModule):
        assert self._average_model is not None
        avg = self._average_model.module
        avg_tensors = dict(avg.named_parameters())
        avg_tensors.update(avg.named_buffers())
        for name, tensor in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
            if name.rsplit(".", 1)[-1] in NOT_AVERAGED:
                continue
            yield avg_tensors[name], tensor

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        for average, current in self._pairs(pl_module):
            tmp = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(tmp)

    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        for average, current in self._pairs(pl_module):
            current.data.copy_(average.data)

    @property
    def updates(self) -> int:
        """Updates of the average so far (counted on the host: no device sync per step)."""
        return self.averaging.updates

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # a fresh average (a restored one sets its count in on_load_checkpoint)
            self.averaging.updates = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning's rule (once per optimizer step, where should_update says), counting updates on the host
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            assert self._average_model is not None
            self._average_model.update_parameters(pl_module)  # the rate of update n + 1 uses n
            self._latest_update_step = trainer.global_step
            self.averaging.updates += 1

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:  # the restored average's count (one read, at restore)
            self.averaging.updates = int(self._average_model.n_averaged)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "weights_origin"):  # save_pretrained records it
            model.weights_origin = {"ema": {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}}
        rank_zero_info(f"EMA: the model now holds the averaged weights (decay {self.decay}, {self.updates} updates)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        averaging = self._average_model is not None
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if not averaging:
            return
        state = checkpoint["state_dict"]
        for name, tensor in pl_module.named_buffers():  # the fitted results, as the live module holds them
            if name.rsplit(".", 1)[-1] in NOT_AVERAGED and name in state:
                state[name] = tensor.detach().clone()
        checkpoint["ema"] = {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}
