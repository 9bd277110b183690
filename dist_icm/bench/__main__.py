"""Benchmarks that print figures: one JSON object on stdout each, ratios measured side by side
in one run (progress goes to stderr).

    python -m dist_icm.bench loss   # ICM loss time and memory vs the global batch N
    python -m dist_icm.bench comm   # bytes each rank sends per global sample, and gloo time
    python -m dist_icm.bench step   # a whole training step: ICM loss vs plain cross-entropy
    python -m dist_icm.bench trainer  # the trainer's step vs a bare loop of the same work
    python -m dist_icm.bench data   # images/s: ffcv loader vs torch DataLoader

``python -m dist_icm.bench NAME --help`` describes each one and its options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICES = ("cpu", "cuda")


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstrings as written, and every option's default in its help."""


class _Parser(argparse.ArgumentParser):
    """argparse with a bad argument reported in one line (``<prog>: error: ...``, exit 2)
    instead of the usage first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(low: int):
    """An argparse type: an int >= ``low`` (else argparse's one-line usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


def _parser() -> argparse.ArgumentParser:
    raw = _Help  # the docstrings as written, with the defaults
    parser = _Parser(prog="python -m dist_icm.bench", description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="what", required=True, metavar="NAME")
    from dist_icm.bench import comm, data, loss, step, trainer

    p = sub.add_parser(
        "loss",
        help="ICM loss: tiled vs untiled (dense, gather)",
        description=loss.__doc__,
        formatter_class=raw,
    )
    p.add_argument(
        "--sizes",
        type=POSITIVE,
        nargs="+",
        default=[1024, 2048, 4096, 8192, 16384],
        help="global batch sizes N (one process: n = N)",
    )
    p.add_argument(
        "--classes", type=_at_least(2), nargs="+", default=[100, 1000], help="class counts C"
    )
    p.add_argument("--tile", type=POSITIVE, default=1024, help="tile edge T of the tiled form")
    p.add_argument("--repeats", type=POSITIVE, default=3, help="timed repeats (after one warm-up)")
    p.add_argument("--device", default=DEVICE, choices=DEVICES, help="cuda if one is visible")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the logits (the loss itself runs in float32)",
    )
    p.add_argument(
        "--max-untiled",
        type=NON_NEGATIVE,
        default=16384,
        help="largest N for the untiled forms (their n x N blocks must fit)",
    )

    c = sub.add_parser(
        "comm",
        help="bytes on the wire per global sample, gloo time",
        description=comm.__doc__,
        formatter_class=raw,
    )
    c.add_argument("--batch", type=POSITIVE, default=3072, help="global batch N")
    c.add_argument("--classes", type=_at_least(2), default=100, help="class count C")
    c.add_argument("--worlds", type=_at_least(2), nargs="+", default=[2, 3], help="process counts")
    c.add_argument("--repeats", type=POSITIVE, default=5, help="timed repeats (after one warm-up)")

    s = sub.add_parser(
        "step",
        help="training step: ICM loss vs plain CE",
        description=step.__doc__,
        formatter_class=raw,
    )
    s.add_argument("--model", default="cifar_resnet18", help="a dist_icm model name")
    s.add_argument("--batch", type=_at_least(2), default=512, help="batch size")
    s.add_argument("--classes", type=_at_least(2), default=10, help="class count")
    s.add_argument("--image", type=_at_least(4), default=32, help="image side in pixels")
    s.add_argument("--steps", type=POSITIVE, default=5, help="back-to-back steps in a timed block")
    s.add_argument("--repeats", type=POSITIVE, default=3, help="timed blocks of each (alternating)")
    s.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed steps of each first")
    s.add_argument("--device", default=DEVICE, choices=DEVICES, help="cuda if one is visible")
    s.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast dtype of the model (fp32: none)",
    )
    s.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last (NHWC) images and weights, the trainer's default (--no-channels-last: "
        "NCHW)",
    )
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument(
        "--profile",
        action="store_true",
        help="also trace a block of each form: where ICM spends more than CE, kernel by kernel",
    )
    s.add_argument(
        "--epochs", type=POSITIVE, default=200, help="epochs of the wall-time projection"
    )

    t = sub.add_parser(
        "trainer",
        help="the trainer's step vs a bare loop of the same work",
        description=trainer.__doc__,
        formatter_class=raw,
    )
    t.add_argument(
        "--root",
        default=argparse.SUPPRESS,  # the formatter's "(default: None)" would contradict the help
        help="JPEG ImageFolder tree (default: the cached CIFAR-10 tree)",
    )
    t.add_argument("--steps", type=POSITIVE, default=5, help="back-to-back steps in a timed block")
    t.add_argument("--repeats", type=POSITIVE, default=3, help="timed blocks of each (alternating)")
    t.add_argument("--profile", action="store_true", help="add each one's top operators")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. model=cifar_resnet18 data.global_batch=128",
    )

    d = sub.add_parser(
        "data",
        help="images/s: ffcv loader vs torch DataLoader",
        description=data.__doc__,
        formatter_class=raw,
    )
    d.add_argument(
        "--root",
        default=argparse.SUPPRESS,  # the formatter's "(default: None)" would contradict the help
        help="JPEG ImageFolder tree (default: the cached CIFAR-10 tree)",
    )
    d.add_argument("--batch", type=POSITIVE, default=256, help="batch size")
    d.add_argument(
        "--workers", type=NON_NEGATIVE, default=2, help="loader workers / decoding threads"
    )
    d.add_argument("--batches", type=_at_least(2), default=150, help="batches per timed pass")
    d.add_argument("--repeats", type=POSITIVE, default=3, help="timed passes of each loader")
    d.add_argument("--step", metavar="MODEL", help="also time training steps of this model")
    d.add_argument(
        "--write-mode",
        default="auto",
        choices=("auto", "raw", "jpg"),
        help="how the ffcv file stores images",
    )
    return parser


# glibc grows its mmap threshold after large frees and then serves big tensors from a heap it
# keeps: peak RSS would miss them. A fixed threshold maps (and unmaps) every tensor over 64 KiB.
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _fail(what: str, message: str) -> NoReturn:
    """Bad input to ``bench what``: one line, exit code 2 (as argparse's own, above)."""
    from dist_icm.bench.data import stop

    stop(f"python -m dist_icm.bench {what}: error: {message}")


def _check(args: argparse.Namespace) -> None:
    """What argparse cannot check alone: a visible GPU for --device cuda, a model name (step's
    --model, data's --step)."""
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        _fail(args.what, "--device cuda: no CUDA device is visible")
    if args.what == "comm":  # before the first world's processes start
        for world in args.worlds:
            if args.batch % world:
                _fail("comm", f"--batch {args.batch} is not divisible by world size {world}")
    flag, name = {
        "step": ("--model", getattr(args, "model", None)),
        "data": ("--step", getattr(args, "step", None)),
    }.get(args.what, (None, None))
    if name is not None:  # before any timing starts
        from dist_icm.models import build_model

        try:
            build_model(name, getattr(args, "classes", 10))
        except ValueError as e:
            _fail(args.what, f"{flag}: {str(e).splitlines()[0]}")


def _run_or_fail(what: str, overrides: list[str], run):
    """``run()``, with a bad config, data set or override (``bench trainer``'s and ``bench
    data``'s) reported in one line, exit 2."""
    from hydra.errors import HydraException

    from dist_icm.config import ConfigError
    from dist_icm.data.datasets import DataError
    from dist_icm.startup import hydra_error_message

    try:
        return run()
    except (ConfigError, DataError) as e:
        _fail(what, str(e).splitlines()[0])
    except HydraException as e:
        _fail(what, hydra_error_message(e, overrides))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _check(args)
    if args.what == "loss" and args.device == "cpu" and not _MALLOC.keys() <= os.environ.keys():
        argv = sys.argv[1:] if argv is None else argv
        cmd = [sys.executable, "-m", "dist_icm.bench", *argv]
        os.execve(sys.executable, cmd, {**os.environ, **_MALLOC})  # the same run, re-started
    from dist_icm.bench import comm, data, loss, step, trainer

    if args.what == "loss":
        out = loss.bench_loss(
            args.sizes,
            args.classes,
            args.tile,
            args.repeats,
            args.device,
            args.dtype,
            args.max_untiled,
        )
    elif args.what == "comm":
        out = comm.bench_comm(args.batch, args.classes, args.worlds, args.repeats)
    elif args.what == "step":
        out = step.bench_step(
            args.model,
            args.batch,
            args.classes,
            args.image,
            args.steps,
            args.repeats,
            args.warmup,
            args.device,
            args.precision,
            args.channels_last,
            args.compile,
            epochs=args.epochs,
            profile=args.profile,
        )
    elif args.what == "trainer":
        root = data.find_cifar10(getattr(args, "root", None), "trainer")
        out = _run_or_fail(
            "trainer",
            args.overrides,
            lambda: trainer.bench_trainer(
                root, args.overrides, args.steps, args.repeats, args.profile
            ),
        )
    else:
        root = data.find_cifar10(getattr(args, "root", None), "data")
        out = _run_or_fail(
            "data",
            [],
            lambda: data.bench_data(
                root,
                args.batch,
                args.workers,
                args.batches,
                args.repeats,
                args.step,
                args.write_mode,
            ),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
