"""`llava-ext convert`, `export` and `refresh-code`: the command-line faces of `llava_ext.convert`'s functions."""

import argparse

from ..convert import convert_checkpoint, export_checkpoint, refresh_checkpoint_code
from ..convert.plan import DTYPES
from . import add_subcommand

CONVERT_EXAMPLE = (
    "llava-ext convert liuhaotian/llava-v1.5-7b ./llava-v1.5-7b-ext "
    "--vision-tower openai/clip-vit-large-patch14-336 --dtype float16 --push-to-hub me/llava-v1.5-7b-ext --private"
)
EXPORT_EXAMPLE = "llava-ext export ./llava-v1.5-7b-ext ./llava-v1.5-7b-stock --dtype float16"
REFRESH_CODE_EXAMPLE = (
    "llava-ext refresh-code me/llava-v1.5-7b-ext --output-dir ./llava-v1.5-7b-ext "
    "--push-to-hub me/llava-v1.5-7b-ext --revision refresh-code"
)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


def add_parser(subparsers) -> None:
    """Add the `convert`, `export` and `refresh-code` subcommands to the `llava-ext` CLI."""
    convert = add_subcommand(
        subparsers, "convert", example=CONVERT_EXAMPLE,
        help="convert an original LLaVA or llava-hf checkpoint to llava_ext",
        description="Convert an original LLaVA (haotian-liu) or llava-hf checkpoint into a llava_ext checkpoint "
        "that loads with trust_remote_code=True. Writing is atomic: OUT appears only when complete.",
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint directory or Hub repo id")
    convert.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    convert.add_argument("--vision-tower", metavar="DIR", help="CLIP tower directory or repo id (original format)")
    convert.add_argument("--base-model", metavar="REPO_ID", help="base model named in the model card")
    add_writing_arguments(convert)
    add_push_arguments(convert, "upload the result to this Hub repo")
    convert.set_defaults(func=run_convert)

    export = add_subcommand(
        subparsers, "export", example=EXPORT_EXAMPLE,
        help="export a llava_ext checkpoint to transformers' stock llava layout",
        description="Write a llava_ext checkpoint as a stock transformers 'llava' checkpoint (no remote code).",
    )
    export.add_argument("src", metavar="SRC", help="llava_ext checkpoint directory or Hub repo id")
    export.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    add_writing_arguments(export)
    export.set_defaults(func=run_export)

    refresh = add_subcommand(
        subparsers, "refresh-code", example=REFRESH_CODE_EXAMPLE,
        help="update the code shipped inside a llava_ext checkpoint to this llava_ext",
        description="Replace the llava_ext code inside a checkpoint (its .py files and the auto_map entries naming\n"
        "them) with the installed llava_ext's, so it loads with trust_remote_code=True on newer transformers.\n"
        "Weights and every other file are kept as they are. In place, the refreshed directory (unchanged files\n"
        "hard-linked) replaces the original only when complete; a Hub repo needs --output-dir or --push-to-hub.",
    )
    refresh.add_argument("checkpoint", metavar="CHECKPOINT", help="llava_ext checkpoint directory or Hub repo id")
    refresh.add_argument("--output-dir", metavar="OUT", help="write a refreshed copy here instead of in place")
    refresh.add_argument("--overwrite", action="store_true", help="replace an existing OUT once the new one is done")
    add_push_arguments(refresh, "upload the refreshed checkpoint to this Hub repo")
    refresh.set_defaults(func=run_refresh_code)


def add_push_arguments(parser: argparse.ArgumentParser, push_help: str) -> None:
    """--push-to-hub, --private and --revision."""
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help=push_help)
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", metavar="R", help="Hub branch to push to")


def add_writing_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --max-shard-size and --overwrite."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard weights past this size (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT once the new one is done")


def run_convert(args: argparse.Namespace) -> int:
    try:
        convert_checkpoint(
            args.src, args.out, vision_tower=args.vision_tower, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, base_model=args.base_model, push_to_hub_repo=args.push_to_hub,
            private=args.private, revision=args.revision,
        )
    except USER_ERRORS as error:
        raise SystemExit(f"llava-ext convert: error: {error}") from None
    return 0


def run_export(args: argparse.Namespace) -> int:
    try:
        export_checkpoint(
            args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
    except USER_ERRORS as error:
        raise SystemExit(f"llava-ext export: error: {error}") from None
    return 0


def run_refresh_code(args: argparse.Namespace) -> int:
    try:
        out = refresh_checkpoint_code(
            args.checkpoint, args.output_dir, overwrite=args.overwrite, push_to_hub_repo=args.push_to_hub,
            private=args.private, revision=args.revision,
        )
    except USER_ERRORS as error:
        raise SystemExit(f"llava-ext refresh-code: error: {error}") from None
    if out is None:  # a Hub checkpoint pushed only
        print(f"Refreshed checkpoint pushed to https://huggingface.co/{args.push_to_hub}")
    else:
        pushed = f" (pushed to https://huggingface.co/{args.push_to_hub})" if args.push_to_hub else ""
        print(f"Refreshed checkpoint: {out}{pushed}")
    return 0


__all__ = ["add_parser", "add_push_arguments", "add_writing_arguments", "run_convert", "run_export", "run_refresh_code"]
