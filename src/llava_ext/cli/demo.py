"""`llava-ext demo`: train a tiny LLaVA on generated shapes (`llava_ext.demo.run_demo`) and print what it learned."""

import argparse
from pathlib import Path

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
    parser.add_argument("--no-progress", action="store_true", help="hide Trainer's progress bars")
    parser.set_defaults(func=run)


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
    print(format_report(run_demo(args.output_dir, quick=args.quick, show_progress=not args.no_progress)))
    return 0


__all__ = ["add_parser", "format_report", "run"]
