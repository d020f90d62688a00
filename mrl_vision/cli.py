"""``mrl-vision``: a thin LightningCLI over the library.

    mrl-vision fit                                  # the quickstart (real MNIST digits, CPU-friendly)
    mrl-vision fit --config configs/quickstart.yaml --trainer.max_epochs 2
    mrl-vision test --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    mrl-vision prepare data/imagenet/train data/imagenet/train.beton --max-resolution 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from importlib import resources
from typing import Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from .callbacks import AccuracyReport, PredictionWriter
from .model import load_pretrained_weights, read_pretrained_config, upgrade_config
from .resume import resolve_last_checkpoint
from .task import MatryoshkaClassifier

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quickstart_config() -> str:
    """Path of the embedded quickstart config (used when no ``--config`` is given)."""
    return str(resources.files("mrl_vision") / "configs" / "quickstart.yaml")


class MRLCLI(LightningCLI):
    """LightningCLI with what the data module knows linked to the model (``num_classes``,
    ``class_names``, ``input_size``, ``mean``, ``std``), ``--ckpt_path`` taking a checkpoint or a
    ``save_pretrained`` folder, and the report and prediction callbacks added where missing."""

    LINKED = ("num_classes", "class_names", "input_size", "mean", "std")
    # Evaluation-time options: taken from this command, not from the checkpoint's hyperparameters.
    EVAL_OPTIONS = ("adaptive_predict", "eval_flip_tta")

    def add_arguments_to_parser(self, parser) -> None:
        for name in self.LINKED:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # A private LightningCLI hook, overridden because it is the only point between parsing and
        # instantiation: the model's arguments come from the checkpoint (in today's spelling) or from
        # a saved model's config.json, and evaluation options from this command.
        self.pretrained_dir = None
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        if os.path.isdir(ckpt_path):
            if sub == "fit":
                raise SystemExit(f"mrl-vision fit: error: --ckpt_path {ckpt_path!r} is a saved model folder; "
                                 "fit resumes from a Lightning checkpoint (.ckpt) only")
            hparams = read_pretrained_config(ckpt_path)
            self.pretrained_dir = ckpt_path
        elif os.path.isfile(ckpt_path):
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
            hparams = upgrade_config(ckpt.get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
        else:
            return
        model = self.config[sub].get("model")
        keep = {k: model.get(k) for k in self.EVAL_OPTIONS if model is not None and model.get(k) is not None}
        hparams.update(pretrained=False, pretrained_file=None)  # the weights come from ckpt_path
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        for key, value in keep.items():
            self.config[sub].model[key] = value

    def _load_pretrained(self) -> None:
        if self.pretrained_dir is not None:
            load_pretrained_weights(self.model.model, self.pretrained_dir)
            self.config_init[self.config.subcommand]["ckpt_path"] = None

    def before_fit(self) -> None:
        if self.config_init["fit"].get("ckpt_path") == "last":
            self.config_init["fit"]["ckpt_path"] = resolve_last_checkpoint(self.trainer)

    def before_validate(self) -> None:
        self._load_pretrained()

    def before_test(self) -> None:
        self._load_pretrained()
        if not any(isinstance(cb, AccuracyReport) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(AccuracyReport())

    def before_predict(self) -> None:
        self._load_pretrained()
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


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"mrl-vision {command}", description=description)


@contextlib.contextmanager
def _user_errors(command: str, *extra: type[Exception]) -> Iterator[None]:
    """Errors about the user's input (bad values, missing files) as one line and exit status 1."""
    try:
        yield
    except (ValueError, FileNotFoundError, *extra) as e:
        raise SystemExit(f"mrl-vision {command}: error: {e}") from None


def prepare_parser() -> argparse.ArgumentParser:
    p = _parser("prepare", "Write an image folder tree (SOURCE/<class>/<image>) or the built-in 'quickstart' "
        "digits to an FFCV .beton file, with a sidecar OUTPUT.beton.json.")
    p.add_argument("source", help="image folder tree, or 'quickstart'")
    p.add_argument("output", help="the .beton file to write")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="quickstart split (default train)")
    p.add_argument("--max-resolution", type=int, default=None, help="cap on the longer side in pixels (default: none)")
    p.add_argument("--write-mode", default="raw", choices=["raw", "jpg", "proportion", "smart"],
                   help="raw pixels, JPEG, or JPEG with --compress-probability (default raw)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="for --write-mode proportion")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--num-workers", type=int, default=-1, help="writer processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per class")
    p.add_argument("--seed", type=int, default=0, help="quickstart split seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    return p


def prepare(args: Sequence[str]) -> dict:
    """``mrl-vision prepare``: parse ``args`` and write the .beton file; returns its sidecar."""
    from .data.beton import write_beton

    a = prepare_parser().parse_args(list(args))
    with _user_errors("prepare", FileExistsError, ImportError):
        info = write_beton(
            a.source, a.output, split=a.split, max_resolution=a.max_resolution, write_mode=a.write_mode,
            compress_probability=a.compress_probability, jpeg_quality=a.jpeg_quality,
            num_workers=a.num_workers, limit=a.limit, seed=a.seed, overwrite=a.overwrite,
        )
    summary = {k: info[k] for k in ("num_samples", "num_classes", "file_size", "seconds")}
    print(f"wrote {a.output}: {json.dumps(summary)}")
    return info


def report_parser() -> argparse.ArgumentParser:
    p = _parser("report", "Read run folders (CSV logger versions, truncate outputs) and write top-1 vs dimensions "
        "(PNG, log-2 axis), a Markdown and a CSV table, and the adaptive trade-off when a run has one.")
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/quickstart/version_0")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report)")
    p.add_argument("--title", default="", help="figure and table title")
    return p


def report(args: Sequence[str]) -> dict:
    """``mrl-vision report``: parse ``args``, write the report, print its table; returns the written paths."""
    from .report import write_report

    a = report_parser().parse_args(list(args))
    with _user_errors("report"):
        written = write_report(a.runs, a.out, title=a.title)
    print(written["md"].read_text(), end="")
    if "adaptive_md" in written:
        print("\nadaptive classification\n\n" + written["adaptive_md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return written


def truncate_parser() -> argparse.ArgumentParser:
    p = _parser("truncate", "Post-hoc truncation of a trained (standard) model: at each size m, a linear probe on the "
        "first m embedding dimensions and one on an SVD projection to m dimensions, fitted on the training "
        "split and scored on the evaluation split. Other arguments (--config, --data.*) choose the data "
        "as for fit (default: the quickstart).")
    p.add_argument("--ckpt_path", required=True, help="the model to truncate: a checkpoint, a run folder or a saved model folder")
    p.add_argument("--out", required=True, help="output folder: truncation.csv and truncation.json")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="sizes (default 8, 16, ... the width)")
    p.add_argument("--fit-split", default="train", choices=["train", "val"], help="split the probes are fitted on")
    p.add_argument("--eval-split", default="test", choices=["val", "test"], help="split they are scored on")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the probes")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where embeddings are computed")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def truncate(args: Sequence[str]) -> list[dict]:
    """``mrl-vision truncate``: probes per size on a checkpoint's embeddings, ``truncation.{csv,json}``."""
    from .report import markdown_table
    from .runs import load_run
    from .truncation import truncate_model, write_truncation

    a, rest = truncate_parser().parse_known_args(list(args))
    with _user_errors("truncate"):
        model, dm = load_run(a.ckpt_path, rest)
        rows, meta = truncate_model(model, dm, a.sizes, a.fit_split, a.eval_split, a.weight_decay, a.device)
    meta["ckpt_path"] = a.ckpt_path
    csv_path = write_truncation(a.out, rows, meta)
    print(f"post-hoc truncation of {a.ckpt_path} ({model.head_kind} head at {model.dims}); probes fitted on "
          f"{meta['num_fit']} {a.fit_split} images, top-1 % on {meta['num_eval']} {a.eval_split} images:")
    print(markdown_table(rows), end="")
    print(f"its own classifier at {model.dims[-1]} dims: {meta['own_classifier_top1']:.2f} %; wrote {csv_path}")
    return rows


def convert_reference_parser() -> argparse.ArgumentParser:
    p = _parser("convert-reference", "Convert an official RAIVNLab/MRL ResNet-50 checkpoint (r50_mrl1_e0_ff2048.pt, ...) into a "
        "saved model folder (model.safetensors + config.json) that test, validate, predict and truncate take "
        "as --ckpt_path and MatryoshkaModel.from_pretrained loads.")
    p.add_argument("checkpoint", help="the reference .pt file")
    p.add_argument("--head", required=True, choices=["mrl", "mrl_e", "ff"], help="what the file holds")
    p.add_argument("--out", required=True, help="the folder to write")
    return p


def convert_reference(args: Sequence[str]) -> str:
    """``mrl-vision convert-reference``: the reference checkpoint as a ``from_pretrained`` folder."""
    from .model import MatryoshkaModel

    a = convert_reference_parser().parse_args(list(args))
    with _user_errors("convert-reference"):
        model = MatryoshkaModel.from_reference(a.checkpoint, head=a.head)
    out = model.save_pretrained(a.out)
    print(f"wrote {out} ({model.head_kind} head, dims {model.dims}, {model.num_classes} classes, blurpool "
          f"{model.config['blurpool']})")
    return str(out)


COMMANDS = {"prepare": prepare, "report": report, "truncate": truncate, "convert-reference": convert_reference}


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point of ``mrl-vision``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    cli(args)


def cli(args: Sequence[str] | dict | None = None, run: bool = True) -> MRLCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``.

    Example (from Python or a test)::

        cli(["fit", "--trainer.fast_dev_run", "1"])
    """
    if args is None:  # from the console: LightningCLI reads sys.argv itself
        sys.argv[1:] = with_default_config(sys.argv[1:])
    elif not isinstance(args, dict):  # a dict is a whole config already
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
