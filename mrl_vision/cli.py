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
from lightning.pytorch.cli import LightningCLI

from .callbacks import AccuracyReport, PredictionWriter
from .model import check_same_classes, load_pretrained_weights, read_pretrained_config, upgrade_config
from .resume import ARCHITECTURE_KEYS, check_checkpoint, resolve_last_checkpoint, use_atomic_checkpoint_io
from .task import MatryoshkaClassifier

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quickstart_config() -> str:
    """Path of the embedded quickstart config (used when no ``--config`` is given)."""
    return str(resources.files("mrl_vision") / "configs" / "quickstart.yaml")


class MRLCLI(LightningCLI):
    """LightningCLI with what the data module knows linked to the model (``num_classes``,
    ``class_names``, ``input_size``, ``mean``, ``std``), ``--ckpt_path`` taking a checkpoint or a
    ``save_pretrained`` folder, the report and prediction callbacks added where missing, and the
    checks that keep evaluation honest: weights must come from somewhere, the checkpoint's classes
    must be the data's, and a model option given on the command line must not contradict them."""

    LINKED = ("num_classes", "class_names", "input_size", "mean", "std")
    # Evaluation-time options: taken from this command, not from the checkpoint's hyperparameters.
    EVAL_OPTIONS = ("adaptive_predict", "eval_flip_tta")
    # What a checkpoint fixes: a command-line value that differs is an error, not silently ignored.
    # (num_classes is linked from the data and checked against it in _check_classes)
    ARCHITECTURE = tuple(k for k in ARCHITECTURE_KEYS if k != "num_classes")
    EVALUATING = ("validate", "test", "predict")

    def add_arguments_to_parser(self, parser) -> None:
        for name in self.LINKED:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict a model without --ckpt_path or pretrained weights "
                                 "(randomly initialised): refused unless this is true")

    def parse_arguments(self, parser, args) -> None:
        self.given_args = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _given_model_options(self) -> set[str]:
        """The ``--model.X`` options written on the command line (not those from config files)."""
        names = set()
        for arg in self.given_args:
            if arg.startswith("--model."):
                names.add(arg[len("--model."):].split("=", 1)[0].removeprefix("init_args."))
        return names

    def _parse_ckpt_path(self) -> None:
        # A private LightningCLI hook, overridden because it is the only point between parsing and
        # instantiation: the model's arguments come from the checkpoint (in today's spelling) or from
        # a saved model's config.json, and evaluation options from this command.
        self.pretrained_dir, self.ckpt_hparams = None, None
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        if sub in self.EVALUATING and not ckpt_path and not config.model.get("pretrained_file") \
                and not config.model.get("pretrained") and not config.get("allow_untrained"):
            raise SystemExit(f"mrl-vision {sub}: error: no weights: give --ckpt_path (a checkpoint or a saved model "
                             "folder) or --model.pretrained_file; --allow_untrained true evaluates a randomly "
                             "initialised model")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        if os.path.isdir(ckpt_path):
            if sub == "fit":
                raise SystemExit(f"mrl-vision fit: error: --ckpt_path {ckpt_path!r} is a saved model folder; "
                                 "fit resumes from a Lightning checkpoint (.ckpt) only")
            hparams = read_pretrained_config(ckpt_path)
            self.pretrained_dir = ckpt_path
        elif os.path.isfile(ckpt_path):
            try:  # truncated or not a checkpoint: one line naming it, not an unpickling traceback
                ckpt = check_checkpoint(ckpt_path)
            except ValueError as e:
                raise SystemExit(f"mrl-vision {sub}: error: {e}") from None
            hparams = upgrade_config(ckpt.get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
        else:
            raise SystemExit(f"mrl-vision {sub}: error: --ckpt_path {ckpt_path!r} does not exist")
        model = config.get("model")
        given = self._given_model_options()
        for key in sorted(given & set(self.ARCHITECTURE)):
            if hparams.get(key) is not None and model.get(key) != hparams[key]:
                raise SystemExit(f"mrl-vision {sub}: error: --model.{key} {model.get(key)!r} cannot apply: the checkpoint "
                                 f"{ckpt_path!r} has {key} {hparams[key]!r} (drop the option)")
        keep = {k: model.get(k) for k in self.EVAL_OPTIONS if model is not None and model.get(k) is not None}
        hparams.update(pretrained=False, pretrained_file=None)  # the weights come from ckpt_path
        self.ckpt_hparams = hparams
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        for key, value in keep.items():
            self.config[sub].model[key] = value

    def instantiate_classes(self) -> None:
        """Errors raised while building the data module or the model come out as one line."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, TypeError) as e:
            sub = self.config.get("subcommand")
            raise SystemExit(f"mrl-vision{' ' + sub if sub else ''}: error: {_root_cause(e)}") from None

    def _check_classes(self) -> None:
        """The checkpoint's classes must be the data's: same count, same names in the same order."""
        saved, dm = self.ckpt_hparams, self.datamodule
        if saved and saved.get("head") == "none":  # an embedder records its classes; retrieval may use others
            return
        if saved and dm is not None:
            try:
                check_same_classes(saved.get("num_classes"), saved.get("class_names"), dm.class_names)
            except ValueError as e:
                raise SystemExit(f"mrl-vision {self.config.subcommand}: error: {e}") from None

    def _before_evaluation(self) -> None:
        self._check_classes()
        if self.pretrained_dir is not None:
            load_pretrained_weights(self.model.model, self.pretrained_dir)
            self.config_init[self.config.subcommand]["ckpt_path"] = None

    def _add_callback(self, callback_type: type) -> None:
        if not any(isinstance(cb, callback_type) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(callback_type())

    def before_fit(self) -> None:
        if self.config_init["fit"].get("ckpt_path") == "last":
            self.config_init["fit"]["ckpt_path"] = resolve_last_checkpoint(self.trainer, self.model)
        self._add_callback(AccuracyReport)  # the per-size validation table at the end of fit
        use_atomic_checkpoint_io(self.trainer)  # a kill during a save never leaves a truncated checkpoint

    def before_validate(self) -> None:
        self._before_evaluation()

    def before_test(self) -> None:
        self._before_evaluation()
        self._add_callback(AccuracyReport)

    def before_predict(self) -> None:
        self._before_evaluation()
        self._add_callback(PredictionWriter)


def _root_cause(error: Exception) -> str:
    """The message of the error that a data module or model raised, out of jsonargparse's wrapping
    ("Does not validate against any of the Union subtypes ... Errors: - Problem with given class_path
    X: <the message> ...")."""
    text = str(error)
    if "Errors:" in text:
        items = text.split("Errors:", 1)[1].split("\n  - ")
        for item in items:
            lines = [ln.strip().removeprefix("- ") for ln in item.strip().splitlines()]
            lines = [ln for ln in lines if ln and not ln.startswith(("Problem with given class_path", "Given value"))]
            if lines and not lines[0].startswith("Expected a <class 'NoneType'>"):
                return lines[0]
    return text.splitlines()[0] if text else type(error).__name__


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
        "digits to an FFCV .beton file, with a sidecar OUTPUT.beton.json (sizes, classes, SHA-256 checksum), or "
        "with --format litdata to a folder of litdata chunks for StreamingDataModule (local; upload it as it is "
        "to stream from object storage); or, with --verify, check an existing .beton file against its sidecar.")
    p.usage = "%(prog)s SOURCE OUTPUT.beton [options]\n       %(prog)s SOURCE OUT_DIR --format litdata [options]" \
              "\n       %(prog)s --verify FILE.beton"
    p.add_argument("source", nargs="?", help="image folder tree, or 'quickstart'")
    p.add_argument("output", nargs="?", help="the .beton file (or, with --format litdata, the folder) to write")
    p.add_argument("--format", default="ffcv", choices=["ffcv", "litdata"],
                   help="ffcv: one .beton file (FFCVDataModule); litdata: a folder of chunks (StreamingDataModule)")
    p.add_argument("--verify", metavar="FILE.beton", default=None,
                   help="check FILE.beton against its sidecar (size, header, labels, checksum) and exit: "
                        "0 when intact, 1 when not")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="quickstart split (default train)")
    p.add_argument("--max-resolution", type=int, default=None, help="cap on the longer side in pixels (default: none)")
    p.add_argument("--write-mode", default=None, choices=["raw", "jpg", "proportion", "smart"],
                   help="ffcv: raw pixels, JPEG, or JPEG with --compress-probability (default raw)")
    p.add_argument("--compress-probability", type=float, default=None, help="ffcv, --write-mode proportion (default 0.5)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="for JPEG written or re-encoded (default 90)")
    p.add_argument("--chunk-bytes", default=None, help="litdata: chunk size (default 64MB)")
    p.add_argument("--num-workers", type=int, default=-1, help="writer processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per class")
    p.add_argument("--seed", type=int, default=0, help="quickstart split seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--allow-empty-classes", action="store_true",
                   help="keep class folders without images as classes (default: fail naming them)")
    return p


def prepare(args: Sequence[str]) -> dict:
    """``mrl-vision prepare``: parse ``args`` and write the .beton file or the litdata folder (or
    ``--verify`` a .beton file); returns its sidecar. SIGINT or SIGTERM stop the writing, remove the
    temporary file and exit with status 130 or 143."""
    from .data.beton import Interrupted, interrupt_on_signals, write_beton

    parser = prepare_parser()
    a = parser.parse_args(list(args))
    if a.verify is not None:
        if a.source is not None:
            parser.error("--verify FILE.beton takes no SOURCE or OUTPUT")
        return _verify_beton(a.verify)
    if a.output is None:
        parser.error("the following arguments are required: " + ("output" if a.source else "source, output"))
    if a.format == "litdata":
        given = [f for f, v in (("--write-mode", a.write_mode), ("--compress-probability", a.compress_probability)) if v is not None]
        if given:
            parser.error(f"{', '.join(given)} apply to --format ffcv; litdata stores the images' own bytes "
                         "(--max-resolution re-encodes larger ones as JPEG)")
    elif a.chunk_bytes is not None:
        parser.error("--chunk-bytes applies to --format litdata")
    try:
        with _user_errors("prepare", FileExistsError, ImportError), interrupt_on_signals():
            if a.format == "litdata":
                from .data.chunks import write_chunks

                info = write_chunks(
                    a.source, a.output, split=a.split, max_resolution=a.max_resolution, jpeg_quality=a.jpeg_quality,
                    num_workers=a.num_workers, limit=a.limit, seed=a.seed, overwrite=a.overwrite,
                    allow_empty_classes=a.allow_empty_classes, chunk_bytes=a.chunk_bytes or "64MB",
                )
            else:
                info = write_beton(
                    a.source, a.output, split=a.split, max_resolution=a.max_resolution, write_mode=a.write_mode or "raw",
                    compress_probability=0.5 if a.compress_probability is None else a.compress_probability,
                    jpeg_quality=a.jpeg_quality, num_workers=a.num_workers, limit=a.limit, seed=a.seed,
                    overwrite=a.overwrite, allow_empty_classes=a.allow_empty_classes,
                )
    except Interrupted as e:
        print(f"mrl-vision prepare: interrupted by {e.name}; nothing was written to {a.output}", file=sys.stderr)
        entry = getattr(sys.modules.get("__main__"), "__spec__", None)
        if getattr(entry, "name", None) == "mrl_vision.cli" or os.path.basename(sys.argv[0]) == "mrl-vision":
            # The console program: the writers are stopped and the temporary file is gone; skip the
            # interpreter's teardown of thousands of modules (2 s on a quiet machine, more on a busy one).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + e.signum)
        raise SystemExit(128 + e.signum) from None
    size = "file_size" if a.format == "ffcv" else "data_bytes"
    summary = {k: info[k] for k in ("num_samples", "num_classes", size, "seconds")}
    print(f"wrote {a.output}: {json.dumps(summary)}")
    return info


def _verify_beton(path: str) -> dict:
    """``prepare --verify FILE``: every check of ``check_beton``, the checksum included; exit 1 on a mismatch."""
    import time
    import warnings

    from .data.beton import check_beton, require_ffcv

    with _user_errors("prepare", ImportError):
        require_ffcv()  # imported first: its own warnings are not this file's
        start = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = check_beton(path, verify_checksum=True)
    for w in caught:
        print(f"mrl-vision prepare: warning: {w.message}", file=sys.stderr)
    what = f"{info['num_samples']} samples, {len(info['classes'])} classes, {info['file_size']} bytes"
    if info.get("checksum"):
        print(f"{path}: OK, {info['checksum'].split(':')[0]} checksum matches ({what}; {time.time() - start:.1f} s)")
    else:
        print(f"{path}: size, header and labels OK ({what}); contents not verified: no checksum recorded")
    return info


def report_parser() -> argparse.ArgumentParser:
    p = _parser("report", "Read run folders (CSV logger versions, truncate and retrieve outputs) and write top-1 vs "
        "dimensions (PNG, log-2 axis), a Markdown and a CSV table, the adaptive trade-off when a run has one, "
        "and the retrieval metrics of retrieve folders.")
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
    if "md" in written:
        print(written["md"].read_text(), end="")
    if "retrieval_md" in written:
        print(written["retrieval_md"].read_text(), end="")
    if "adaptive_md" in written:
        print("\nadaptive classification\n\n" + written["adaptive_md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return written


def truncate_parser() -> argparse.ArgumentParser:
    p = _parser("truncate", "Post-hoc truncation of a trained (standard) model: at each size m, a linear probe on the "
        "first m embedding dimensions and one on an SVD projection to m dimensions, fitted on the training "
        "split and scored on the evaluation split (beside an MRL model's own heads at each size, head_top1). "
        "Other arguments (--config, --data.*) choose the data as for fit (default: the quickstart).")
    p.add_argument("--ckpt_path", required=True, help="the model to truncate: a checkpoint, a run folder or a saved model folder")
    p.add_argument("--out", required=True, help="output folder: truncation.csv and truncation.json")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="sizes (default 8, 16, ... the width)")
    p.add_argument("--fit-split", default="train", choices=["train", "val"], help="split the probes are fitted on")
    p.add_argument("--eval-split", default="test", choices=["val", "test"], help="split they are scored on")
    p.add_argument("--weight-decay", type=float, nargs="+", default=[1e-4],
                   help="L2 penalty of the probes; several values: each size's probes take the one most accurate on "
                        "--select-split (reported as prefix_wd, svd_wd)")
    p.add_argument("--select-split", default="val", choices=["train", "val", "test"],
                   help="split the weight decay is chosen on when several are given (not the evaluation split)")
    p.add_argument("--layers", type=int, default=None,
                   help="cut a transformer to its first LAYERS blocks first (MatryoshkaModel.truncate): the probes "
                        "then read the shallow model's embedding (the baseline of 2D Matryoshka)")
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
        if a.layers is not None:
            model.truncate(a.layers)
        rows, meta = truncate_model(model, dm, a.sizes, fit_split=a.fit_split, eval_split=a.eval_split,
                                    weight_decay=a.weight_decay, device=a.device, select_split=a.select_split)
    meta["ckpt_path"] = a.ckpt_path
    meta["layers"] = model.config["layers"]
    csv_path = write_truncation(a.out, rows, meta)
    cut = f", first {a.layers} of {model.backbone_name}'s blocks" if a.layers is not None else ""
    print(f"post-hoc truncation of {a.ckpt_path} ({model.head_kind} head at {model.dims}{cut}); probes fitted on "
          f"{meta['num_fit']} {a.fit_split} images, top-1 % on {meta['num_eval']} {a.eval_split} images"
          + (f", weight decay chosen per size on {meta['num_select']} {a.select_split} images:" if "select_split" in meta else ":"))
    shown = [{k: (f"{v:g}" if k.endswith("_wd") else v) for k, v in r.items()} for r in rows]  # 0.0001, not 0.00
    print(markdown_table(shown), end="")
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


def _command(module: str):
    """A command whose implementation (parser included) lives in ``mrl_vision.<module>.main``,
    imported only when the command runs."""
    def run(args: Sequence[str]):
        from importlib import import_module

        return import_module(f"mrl_vision.{module}").main(list(args))

    return run


COMMANDS = {"prepare": prepare, "report": report, "truncate": truncate, "convert-reference": convert_reference,
            "embed": _command("embeddings"), "export": _command("export"), "retrieve": _command("retrieve")}


USAGE = """usage: mrl-vision COMMAND [options]    (mrl-vision COMMAND --help for a command's options)

training and evaluation (LightningCLI; default config: the quickstart digits):
  fit                 train (--ckpt_path last resumes)
  validate            per-size accuracy on the validation split (--ckpt_path: a checkpoint or saved model)
  test                the same on the test split; writes test_accuracy.csv/.png and the cascade's curve
  predict             predictions.csv: class and confidence at every size, or the cascade's
tools:
  prepare             an image folder tree -> an FFCV .beton file (+ sidecar)
  truncate            post-hoc truncation probes of a trained model at every size
  embed               a split's full-width embeddings -> .npy shards + a JSON sidecar
  retrieve            search and retrieval metrics at every size, adaptive and funnel retrieval
  export              an embedder of the first m dims -> ONNX or TorchScript
  report              run folders -> accuracy-vs-dims figure and tables
  convert-reference   an official RAIVNLab/MRL checkpoint -> a saved model folder
"""


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point of ``mrl-vision``."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    try:
        cli(args)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    """End a DDP run's process group before the interpreter exits (PyTorch asks for it: left to exit,
    gloo's threads can abort the process with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
