"""The `llava-ext` command: a thin argparse layer over the library's typed functions.

Each subcommand lives in the module that implements it, which exposes `add_parser(subparsers)`; the parser it adds
sets `func` to a function taking the parsed `argparse.Namespace`. Modules are imported only when the CLI runs.
"""

import argparse
import importlib
import importlib.util

# subcommand modules, in the order `--help` lists them
SUBCOMMAND_MODULES = (
    "llava_ext.demo", "llava_ext.train", "llava_ext.chat", "llava_ext.cli_serve", "llava_ext.cli_eval", "llava_ext.convert"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-ext",
        description="LLaVA on Hugging Face Transformers: train, chat, convert and export checkpoints.",
        epilog="example: llava-ext demo --quick",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["build_parser", "main"]
