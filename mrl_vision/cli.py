"""``mrl-vision``: a thin LightningCLI over the library.

    mrl-vision fit                                  # the quickstart (real MNIST digits, CPU-friendly)
    mrl-vision fit --config configs/quickstart.yaml --trainer.max_epochs 2
    mrl-vision test --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .callbacks import PredictionWriter
from .model import MatryoshkaClassifier

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quickstart_config() -> str:
    """Path of the embedded quickstart config (used when no ``--config`` is given)."""
    return str(resources.files("mrl_vision") / "configs" / "quickstart.yaml")


class MRLCLI(LightningCLI):
    """LightningCLI with ``num_classes`` linked from the data module to the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_predict(self) -> None:
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())


def with_default_config(args: Sequence[str]) -> list[str]:
    """Insert the quickstart config after the subcommand when the user gave no ``--config``."""
    args = list(args)
    if not args or args[0] not in TRAINER_SUBCOMMANDS:
        return args
    if any(a == "--config" or a.startswith("--config=") or a == "-c" for a in args[1:]):
        return args
    return [args[0], "--config", quickstart_config(), *args[1:]]


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point of ``mrl-vision``."""
    cli(args)


def cli(args: Sequence[str] | None = None, run: bool = True) -> MRLCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``.

    Example (from Python or a test)::

        cli(["fit", "--trainer.fast_dev_run", "1"])
    """
    if args is None:  # from the console: LightningCLI reads sys.argv itself
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(args)
    return MRLCLI(
        MatryoshkaClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
