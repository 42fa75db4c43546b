"""`llava-ext serve`: transformers' own OpenAI-compatible server (`transformers serve`) for llava_ext checkpoints,
batching concurrent requests (`--max-batch-size`, `--batch-wait-ms`)."""

import argparse

from ..serve import transformers_serve_command

EXAMPLE = (
    "example: llava-ext serve ./llava-v1.5-7b-ext --host 127.0.0.1 --port 8000 --device cuda:0 --dtype float16 "
    "--max-batch-size 16"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to `llava-ext`'s subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint with transformers serve (OpenAI-compatible API); `serve --help` lists its options",
        # Every argument is transformers serve's, `--help` included: with no prefix character of its own the parser
        # takes them all, in any order, and the command below parses them.
        prefix_chars="\0",
        add_help=False,
    )
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, metavar="CHECKPOINT [OPTIONS]")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run transformers serve with the remaining arguments, llava_ext enabled with the batching options among them;
    exits as the command does (`--help` exits 0)."""
    try:
        command = transformers_serve_command(epilog=f"\b\n{EXAMPLE}")  # \b: click keeps the example on one line
    except ImportError as error:  # serving packages or the serve command missing: one line, not a traceback
        raise SystemExit(f"llava-ext serve: error: {error}") from None
    command.main(args=args.serve_args, prog_name="llava-ext serve")
    return 0


__all__ = ["EXAMPLE", "add_parser", "run"]
