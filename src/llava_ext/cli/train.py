"""`llava-ext train` and `llava-ext merge-lora`: `llava_ext.train.train` from a YAML recipe, and `merge_lora`."""

import argparse

import torch

from ..train import merge_lora, parse_config, train
from . import add_subcommand

TRAIN_EXAMPLE = (
    "llava-ext train configs/finetune.yaml --model_name_or_path out/stage1 "
    "--data_path data/llava_v1_5_mix665k.json --image_folder data/images --output_dir out/stage2"
)
MERGE_LORA_EXAMPLE = "llava-ext merge-lora out/lora out/merged"


def add_parser(subparsers) -> None:
    """Add the `train` and `merge-lora` subcommands."""
    parser = add_subcommand(
        subparsers, "train", example=TRAIN_EXAMPLE,
        help="fine-tune a LLaVA model from a YAML recipe (Trainer; torchrun / accelerate launch work as is)",
        description="Train with a YAML recipe from configs/; any ModelArguments, DataArguments or TrainingArguments "
        "key can be overridden as --key value.",
    )
    parser.add_argument("config", help="YAML recipe, e.g. configs/pretrain-projector.yaml")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs overriding the recipe")
    parser.set_defaults(func=run_train)

    merge = add_subcommand(
        subparsers, "merge-lora", example=MERGE_LORA_EXAMPLE,
        help="merge a LoRA adapter (and its projector) into a full checkpoint",
        description="Fold a LoRA run's adapter into its base model and save a full checkpoint with the processor.",
    )
    merge.add_argument("adapter_dir", help="output_dir or checkpoint-N of a run with lora_enable: true")
    merge.add_argument("output_dir", help="where the merged checkpoint is written (must not exist unless --overwrite)")
    merge.add_argument("--base-model", default=None, help="base checkpoint (default: the adapter's own record)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output_dir once merged")
    merge.set_defaults(func=run_merge_lora)


def run_train(args: argparse.Namespace) -> int:
    train(*parse_config(args.config, args.overrides))
    # Under torchrun / accelerate launch: tear the process group down before exit; gloo's threads left running at
    # interpreter exit sometimes abort the process ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    try:
        merge_lora(args.adapter_dir, args.output_dir, base_model=args.base_model, overwrite=args.overwrite)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"llava-ext merge-lora: error: {error}") from None
    return 0


__all__ = ["add_parser", "run_merge_lora", "run_train"]
