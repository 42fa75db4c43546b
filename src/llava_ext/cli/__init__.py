"""The `llava-ext` command: a thin argparse layer over the library's typed functions.

One module a subcommand (or a few related ones), each exposing `add_parser(subparsers)`: the parsers it adds (with
`add_subcommand`, so each `--help` ends with an example) set `func` to a function that takes the parsed
`argparse.Namespace`, calls the library and returns the exit code. The modules, and the library code behind them,
are imported only when the CLI runs, never by `import llava_ext`.

    llava-ext demo | train | merge-lora | chat | serve | eval | convert | export | refresh-code
"""

import argparse
import importlib

# subcommand modules, in the order `--help` lists them
SUBCOMMAND_MODULES = ("demo", "train", "chat", "serve", "eval", "convert")


def add_subcommand(subparsers, name: str, *, help: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose `--help` keeps `description`'s line breaks and ends with `example: EXAMPLE` on one line."""
    return subparsers.add_parser(
        name, help=help, description=description, epilog=f"example: {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """`--quantize`, as `llava_ext.chat.load_model_and_processor` takes it."""
    from ..quantization import INT4_DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES

    parser.add_argument(
        "--quantize", choices=list(QUANTIZE_CHOICES), default=None,
        help="int8: torchao int8 weight-only language model, the vision tower and projector in --dtype (whose "
        "'auto' is then bf16 on a CPU with native bf16, else fp32); int4: torchao int4 weight-only (groups of "
        f"{INT4_DEFAULT_GROUP_SIZE} weights, lm_head int8), CPU and bf16 only, quantized at every load (it cannot be "
        "saved). Both need torchao: pip install 'llava-ext[quant]'",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-ext",
        description="LLaVA on Hugging Face Transformers: train, chat, convert and export checkpoints.",
        epilog="example: llava-ext demo --quick",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args) or 0


__all__ = ["add_quantize_argument", "add_subcommand", "build_parser", "main"]
