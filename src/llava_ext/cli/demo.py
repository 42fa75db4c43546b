"""`llava-ext demo`: train a tiny LLaVA on generated shapes (`llava_ext.demo.run_demo`) and print what it learned.

By default it reads like a tool: one line a stage, progress bars, the report. `--verbose` brings back the library's
logs: transformers' INFO logging, its load/save progress bars and Trainer's logged losses, a line each.
"""

import argparse
import contextlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from transformers.utils import logging as transformers_logging

from ..demo import DemoResult, run_demo
from . import add_subcommand

EXAMPLE = "llava-ext demo --output-dir llava-ext-demo"


def add_parser(subparsers) -> None:
    """Add the `demo` subcommand."""
    parser = add_subcommand(
        subparsers, "demo", example=EXAMPLE,
        help="train a tiny LLaVA on generated shapes, offline, in minutes on CPU",
        description="Draw a synthetic shapes dataset, train a tiny LLaVA (stage 1 then stage 2) with Trainer, reload "
        "it with AutoModelForImageTextToText(trust_remote_code=True) and report held-out accuracy. No downloads.",
    )
    parser.add_argument("--quick", action="store_true", help="a shortened run for CI (under a minute)")
    parser.add_argument("--output-dir", default="llava-ext-demo", help="where data and checkpoints go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the stage lines stay)")
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show transformers' INFO logs, its load/save progress bars and each loss Trainer logs",
    )
    parser.set_defaults(func=run)


@contextlib.contextmanager
def transformers_output(verbose: bool, show_progress: bool) -> Iterator[None]:
    """transformers' INFO logs only when `verbose`, its own (instant load/save) progress bars only when `verbose` and
    `show_progress`; both switches are put back afterwards, for callers of `main()` in the same process."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    if verbose:
        transformers_logging.set_verbosity_info()
    if not (verbose and show_progress):
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()


def format_report(result: DemoResult) -> str:
    """Sample answers, the held-out accuracy against chance, and the `llava-ext eval` command that scores it again."""
    data = Path(result.output_dir).parent / "data"
    return "\n".join([
        f"\nSample answers from {result.output_dir} (reloaded with trust_remote_code=True):",
        *(f"  Q: {question:<36} expected: {expected:<9} model: {answer}" for question, expected, answer in result.samples),
        f"\nAccuracy on {result.num_questions} held-out questions: {result.accuracy:.1%} "
        f"(chance {result.chance:.0%}); total time {result.seconds:.0f} s.",
        f"Score it again with: llava-ext eval {result.output_dir} --data {data / 'heldout.jsonl'}",
    ])


def run(args: argparse.Namespace) -> int:
    show_progress = not args.no_progress
    with transformers_output(args.verbose, show_progress):
        result = run_demo(
            args.output_dir, quick=args.quick, show_progress=show_progress, verbose=args.verbose,
            on_stage=partial(print, flush=True),  # flushed: the bars below each stage line go to stderr
        )
    print(format_report(result))
    return 0


__all__ = ["add_parser", "format_report", "run", "transformers_output"]
