"""`llava-ext convert`, `export` and `refresh-code`: the command-line faces of `llava_ext.convert`'s functions."""

import argparse

from ..convert import convert_checkpoint, export_checkpoint, export_gguf, refresh_checkpoint_code
from ..convert.plan import DTYPES
from ..convert.to_gguf import OUTTYPES
from . import add_subcommand

CONVERT_EXAMPLE = (
    "llava-ext convert liuhaotian/llava-v1.5-7b ./llava-v1.5-7b-ext "
    "--vision-tower openai/clip-vit-large-patch14-336 --dtype float16 --push-to-hub me/llava-v1.5-7b-ext --private"
)
EXPORT_EXAMPLE = "llava-ext export ./llava-v1.5-7b-ext ./llava-v1.5-7b-stock --dtype float16"
EXPORT_GGUF_EXAMPLE = "llava-ext export ./llava-v1.5-7b-ext ./llava-v1.5-7b-gguf --format gguf --outtype q8_0"
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
        description="Convert an original LLaVA (haotian-liu) or llava-hf checkpoint (llava, llava_next, "
        "llava_onevision) into a llava_ext checkpoint that loads with trust_remote_code=True. Writing is atomic: OUT appears only when complete.",
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
        help="export a llava_ext checkpoint to transformers' stock layout (llava, llava_next, llava_onevision) or to "
        "GGUF for llama.cpp",
        description="Write a llava_ext checkpoint as a stock transformers checkpoint of the family it mirrors (no\n"
        "remote code): llava_ext -> 'llava', llava_ext_next -> 'llava_next', llava_ext_onevision -> 'llava_onevision'; or\n"
        "with --format gguf as the two files llama.cpp loads: OUT/model-OUTTYPE.gguf (language model, tokenizer, chat\n"
        "template) and OUT/mmproj-model-OUTTYPE.gguf (vision tower and projector), for\n"
        "`llama-mtmd-cli -m OUT/model-q8_0.gguf --mmproj OUT/mmproj-model-q8_0.gguf` or `llama-server ... --mmproj`.\n"
        "Writing is atomic: OUT appears only when complete. GGUF:\n"
        f"  {EXPORT_GGUF_EXAMPLE}",
    )
    export.add_argument("src", metavar="SRC", help="llava_ext checkpoint directory or Hub repo id")
    export.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    export.add_argument("--format", choices=["stock", "gguf"], default="stock",
                        help="stock: transformers' own layout of the family (default); gguf: llama.cpp's model + mmproj files")
    export.add_argument("--outtype", choices=OUTTYPES,
                        help="--format gguf only: type of the weight matrices (default: f32); norms, biases and "
                        "position/patch embeddings stay f32, as llama.cpp's converter keeps them")
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
    if args.format == "gguf":
        return run_export_gguf(args)
    try:
        if args.outtype is not None:
            raise ValueError(f"--outtype {args.outtype} applies to --format gguf; for the stock layout use --dtype.")
        export_checkpoint(
            args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
    except USER_ERRORS as error:
        raise SystemExit(f"llava-ext export: error: {error}") from None
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    try:
        if args.dtype is not None:
            raise ValueError(f"--dtype {args.dtype} applies to --format stock; for GGUF use --outtype "
                             f"({', '.join(OUTTYPES)}).")
        model, mmproj = export_gguf(args.src, args.out, args.outtype or "f32", overwrite=args.overwrite)
    except (*USER_ERRORS, ImportError) as error:  # ImportError: the gguf extra is not installed (the message says so)
        raise SystemExit(f"llava-ext export: error: {error}") from None
    print(f"Language model: {model}\nVision tower and projector: {mmproj}\n"
          f"Run: llama-mtmd-cli -m {model} --mmproj {mmproj}")
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


__all__ = [
    "add_parser",
    "add_push_arguments",
    "add_writing_arguments",
    "run_convert",
    "run_export",
    "run_export_gguf",
    "run_refresh_code",
]
