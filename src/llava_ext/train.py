"""LLaVA fine-tuning with transformers' `Trainer`: argument dataclasses, freezing, LoRA and merging it back (the
`llava-ext train` / `merge-lora` commands are `cli/train.py`).

A run is one YAML recipe (keys of `ModelArguments`, `DataArguments` and every `TrainingArguments` field; data and
model keys keep the original LLaVA script's names) plus command-line overrides:

    llava-ext train configs/finetune.yaml --model_name_or_path out/stage1 --learning_rate 1.0e-5

    stage 1 (pretrain-projector.yaml)  vision tower frozen | projector trained | language model frozen
    stage 2 (finetune.yaml)            vision tower frozen | projector trained | language model trained
    LoRA    (finetune-lora.yaml)       vision tower frozen | projector trained | LoRA on the language model's linears
    QLoRA   (finetune-qlora.yaml)      as LoRA, the frozen language model loaded in 4-bit (bitsandbytes, CUDA only)

The same command runs on one process, under `torchrun --nproc_per_node N` and under `accelerate launch`: `Trainer`
reads the launcher's environment. It also runs as is without a GPU: the recipes' `bf16: true` then trains on the CPU in
bf16 where the CPU has it natively (AVX512-BF16), else in fp32, with one warning saying which.

Every checkpoint (mid-run `checkpoint-N` and the final one) holds the processor and, for full runs, the model code, so
it loads with `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`; LoRA runs save an adapter
that includes the projector (`modules_to_save`).
"""

import importlib.util
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from .compat import (
    CHECKPOINTING_ARG, CHECKPOINTING_ARGS, LengthGroupedSampler, TrainOutput, default_progress_callback,
    get_last_checkpoint, keep_used_weight_conversions,
)
from .convert.io import atomic_directory, check_checkpoint_files, check_output_free
from .data import LlavaConversationDataset, LlavaExtDataCollator, skip_summary
from .quantization import bitsandbytes_config, check_bitsandbytes_environment
from .quantization import cpu_has_native_bf16 as _cpu_has_native_bf16
from .vision import normalize_layer_indices

logger = logging.getLogger(__name__)

VERY_LARGE_MAX_LENGTH = 10**8  # tokenizers without a real limit report int(1e30)


@dataclass
class ModelArguments:
    """What to load and which parts train. Names follow the original LLaVA training script."""

    model_name_or_path: str = field(metadata={"help": "Checkpoint to start from (a folder or a Hub id)."})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor to use; defaults to model_name_or_path."}
    )
    trust_remote_code: bool = field(default=True, metadata={"help": "Load checkpoints that carry their own code."})
    # Freezing
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision tower's weights fixed."})
    freeze_projector: bool = field(default=False, metadata={"help": "Keep the multi-modal projector fixed."})
    freeze_language_model: bool = field(
        default=False, metadata={"help": "Keep the language model (and lm_head) fixed; implied by lora_enable."}
    )
    tune_vision_layers: int = field(
        default=0,
        metadata={"help": "With freeze_vision_tower, still train the last N vision layers the features are read from."},
    )
    # LoRA (PEFT) on the language model
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the language model."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Regex of module names to adapt; defaults to every linear layer of the language model."},
    )
    # Quantization: QLoRA (bitsandbytes on CUDA), the vision tower, projector and lm_head left unquantized
    bits: int = field(
        default=16,
        metadata={
            "help": "Language model weights while training: 16 (as loaded), or 4 / 8 with bitsandbytes (QLoRA: "
            "needs lora_enable and a CUDA GPU)."
        },
    )
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type with bits: 4."})
    double_quant: bool = field(default=True, metadata={"help": "With bits: 4, quantize the 4-bit scales too."})

    def __post_init__(self):
        if self.bits not in (4, 8, 16):
            raise ValueError(
                f"bits={self.bits!r} is not supported; use 16 (no quantization), 8 or 4 (bitsandbytes, CUDA only)."
            )
        if self.bits < 16 and not self.lora_enable:
            raise ValueError(
                f"bits={self.bits} trains LoRA adapters on a frozen quantized language model (QLoRA), so it needs "
                "lora_enable: true (--lora_enable true, as configs/finetune-qlora.yaml sets), or use bits: 16."
            )


@dataclass
class DataArguments:
    """Where the data is and how it is cut. Names follow the original LLaVA training script."""

    data_path: str = field(metadata={"help": "Training data: .json list or .jsonl, LLaVA or messages format."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder image paths are relative to; defaults to the data file's folder."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation data, same formats."})
    model_max_length: int | None = field(
        default=None, metadata={"help": "Longest training sequence in tokens; defaults to the tokenizer's limit."}
    )
    on_bad_sample: Literal["raise", "skip"] = field(
        default="raise",
        metadata={
            "help": "A malformed record or one with a missing/unreadable image: raise naming it, or skip it with a "
            "warning; skipped samples are counted and reported at the end of training."
        },
    )
    allow_images_outside_folder: bool = field(
        default=False,
        metadata={
            "help": "Accept image paths outside image_folder ('../x.png', absolute paths elsewhere); only for a "
            "data file you trust. Symlinks inside image_folder are followed either way."
        },
    )
    on_overlong: Literal["raise", "drop"] = field(
        default="raise",
        metadata={"help": "A sample whose image tokens do not fit model_max_length: raise, or drop with a warning."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch samples of similar length (same as train_sampling_strategy=group_by_length)."},
    )


def parse_config(
    config_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Read a YAML recipe with `HfArgumentParser` and apply `--key value` overrides on top.

    The YAML values become the parser's defaults (converted exactly as command-line strings are), so a recipe may
    leave out required keys (`model_name_or_path`, `data_path`) for the command line to give.

    Args:
        config_path (`str` or `os.PathLike`): a YAML file of `ModelArguments`, `DataArguments` and
            `TrainingArguments` keys.
        overrides (`list[str]`): command-line style overrides, e.g. `["--learning_rate", "1e-5", "--bf16", "false"]`.

    Returns:
        `(ModelArguments, DataArguments, TrainingArguments)`.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"Config {str(path)!r} does not exist; pass a YAML recipe such as configs/finetune.yaml.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"Config {str(path)!r} must be a YAML mapping of argument names to values.")
    for name in CHECKPOINTING_ARGS:  # either name in a recipe, passed under the installed release's
        if name in values and name != CHECKPOINTING_ARG:
            values[CHECKPOINTING_ARG] = values.pop(name)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Config {str(path)!r} has unknown keys {unknown}; use ModelArguments, DataArguments or TrainingArguments "
            "field names (see `llava-ext train CONFIG --help`)."
        )
    for action in parser._actions:  # keys the YAML gives are no longer required on the command line
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)  # string defaults are converted as command-line values would be
    namespace, remaining = parser.parse_known_args(args=list(overrides))
    if remaining:
        raise ValueError(
            f"Unknown command-line arguments {remaining}; use --key value with ModelArguments, DataArguments or "
            "TrainingArguments field names (see `llava-ext train CONFIG --help`)."
        )
    # The precision is settled before TrainingArguments exists: its __post_init__ rejects bf16 on a machine without a
    # bf16 GPU ("Your setup doesn't support bf16/gpu") before anything could adjust it.
    return parser.parse_dict(_resolve_precision(vars(namespace)))


def _has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA/ROCm, XPU, MPS...) or torch_xla is installed (TPU)."""
    if importlib.util.find_spec("torch_xla") is not None:
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _cuda_has_native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer), not torch's emulation on older GPUs, which is slower than fp16."""
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.is_bf16_supported()


def _resolve_precision(values: dict) -> dict:
    """Turn a recipe's `bf16: true` into what this machine runs well, with one warning saying what and why.

    So one recipe runs everywhere:

        bf16 asked for, training on          ->  precision   device
        a GPU with bf16                           bf16        GPU      (nothing changes, no warning)
        a CUDA GPU without bf16 (pre-Ampere)      fp16        GPU
        no GPU (or use_cpu), CPU with AVX512-BF16 bf16        CPU      (no warning when use_cpu was given)
        no GPU (or use_cpu), other CPUs           fp32        CPU

    Args:
        values (`dict`): parsed argument values by field name (`bf16`, `fp16`, `bf16_full_eval`, `use_cpu`...).

    Returns:
        `values`, changed in place where needed.
    """
    if not (values["bf16"] or values["bf16_full_eval"]):
        return values
    if values["use_cpu"] or not _has_accelerator():
        where = "use_cpu is set" if values["use_cpu"] else "no GPU was found"
        if _cpu_has_native_bf16():
            if not values["use_cpu"]:
                warnings.warn(
                    f"bf16: true and {where}: training on the CPU in bf16, which this CPU computes natively "
                    "(AVX512-BF16). Add --use_cpu true to silence this, or --bf16 false to train in fp32.",
                    stacklevel=3,
                )
                values["use_cpu"] = True
        else:
            warnings.warn(
                f"bf16: true but {where} and this CPU has no native bf16 (AVX512-BF16), where bf16 is emulated and "
                "slower than fp32: training on the CPU in fp32. Add --bf16 false to silence this.",
                stacklevel=3,
            )
            values.update(bf16=False, bf16_full_eval=False, use_cpu=True)
    elif torch.cuda.is_available() and not _cuda_has_native_bf16():
        warnings.warn(
            "bf16: true but this GPU has no bf16 (it needs Ampere or newer): training in fp16 instead. Add --bf16 "
            "false --fp16 true to silence this.",
            stacklevel=3,
        )
        values.update(bf16=False, fp16=True, bf16_full_eval=False)
    return values


def _vision_layers_in_use(model: PreTrainedModel) -> list[nn.Module]:
    """The vision encoder layers the selected features depend on, in order."""
    tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    layers = next(module for name, module in tower.named_modules() if name.endswith("layers"))
    deepest = max(normalize_layer_indices(model.config.vision_feature_layer, len(layers)))
    return list(layers[:deepest])


def freeze_parameters(model: PreTrainedModel, model_args: ModelArguments) -> list[str]:
    """Set `requires_grad` per part as `model_args` says; LoRA freezes the language model (PEFT adds adapters).

    Args:
        model (`PreTrainedModel`): a LLaVA model with `model.vision_tower`, `model.multi_modal_projector`,
            `model.language_model` and `lm_head`.
        model_args (`ModelArguments`): the `freeze_*`, `tune_vision_layers` and `lora_enable` switches.

    Returns:
        The names of the parameters left trainable.
    """
    inner = model.model
    frozen = {
        "vision_tower": model_args.freeze_vision_tower,
        "multi_modal_projector": model_args.freeze_projector,
        "language_model": model_args.freeze_language_model or model_args.lora_enable,
    }
    for part, is_frozen in frozen.items():
        getattr(inner, part).requires_grad_(not is_frozen)
    model.lm_head.requires_grad_(not frozen["language_model"])
    if model_args.tune_vision_layers < 0:
        raise ValueError(f"tune_vision_layers={model_args.tune_vision_layers} must be >= 0 (a number of layers).")
    if model_args.freeze_vision_tower and model_args.tune_vision_layers:
        in_use = _vision_layers_in_use(model)
        if model_args.tune_vision_layers > len(in_use):
            raise ValueError(
                f"tune_vision_layers={model_args.tune_vision_layers} but the features are read after layer "
                f"{len(in_use)} (vision_feature_layer={model.config.vision_feature_layer}); use at most {len(in_use)}."
            )
        for layer in in_use[-model_args.tune_vision_layers :]:
            layer.requires_grad_(True)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not trainable and not model_args.lora_enable:
        raise ValueError("Every part is frozen, so nothing would train; set one of the freeze_* switches to false.")
    return trainable


def lora_target_regex(model: PreTrainedModel) -> str:
    """A PEFT `target_modules` regex matching every `nn.Linear` inside the language model, for any backbone."""
    prefix = next(name for name, _ in model.named_modules() if name.endswith("language_model"))
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
         if name.startswith(prefix + ".") and isinstance(module, nn.Linear)}
    )
    return rf"{re.escape(prefix)}\..*\.({'|'.join(leaves)})"


def _import_peft():
    """peft, an optional dependency needed only for LoRA; a clear error naming the install when it is missing."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "LoRA training and merge-lora need peft, which is not installed: pip install 'llava-ext[train]' "
            "(or pip install peft), or set lora_enable: false."
        ) from error
    return peft


def apply_lora(model: PreTrainedModel, model_args: ModelArguments):
    """Wrap `model` in a PEFT LoRA model: adapters on the language model, the projector trained and saved in full."""
    peft = _import_peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or lora_target_regex(model),
        modules_to_save=[] if model_args.freeze_projector else ["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class LlavaExtTrainer(Trainer):
    """`Trainer` whose length-grouped sampler reads the dataset's cheap `lengths` instead of tokenizing every item, and
    which reports the samples a `LlavaConversationDataset` with `on_bad_sample="skip"` left out.

    After training, `train()` adds `train_skipped_samples` (and `eval_skipped_samples` with an eval set) to the
    returned metrics (and, with `on_bad_sample="skip"`, to the log history), and logs a warning "skipped N of M samples:
    record I (id ...): reason; ..." when N > 0. N counts the samples the run met (from every DataLoader worker and
    every process), once each.
    """

    def _get_train_sampler(self, train_dataset=None):  # compat.TRAIN_SAMPLER_HOOK
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def _unreadable_everywhere(self, dataset: LlavaConversationDataset) -> torch.Tensor:
        """The dataset's skip flags summed over the processes of a distributed run (each reads its own shard)."""
        flags = dataset.unreadable.to(self.args.device, torch.int32)  # a copy; NCCL needs it on the GPU
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags)
        return flags.cpu()

    def train(self, *args, **kwargs) -> TrainOutput:
        output = super().train(*args, **kwargs)
        counts = {}
        for split, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            if not isinstance(dataset, LlavaConversationDataset):
                continue
            if dataset.on_bad_sample == "raise":  # nothing can have been skipped
                output.metrics[f"{split}_skipped_samples"] = 0
                continue
            skipped = dataset.skipped_samples(self._unreadable_everywhere(dataset))  # a collective: every rank runs it
            counts[f"{split}_skipped_samples"] = len(skipped)
            if skipped and self.is_world_process_zero():
                summary = skip_summary(skipped, dataset.num_records)
                logger.warning("%s data (on_bad_sample='skip'): %s", split.capitalize(), summary)
        if counts:  # into the log history (trainer_state.json) and the report_to integrations too
            output.metrics.update(counts)
            self.log(dict(counts))
        return output


def _local_or_hub(path: str) -> str:
    """Absolute path for local folders, so adapters record a base path that works from any directory."""
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def _quantized_load_kwargs(model_args: ModelArguments, training_args: TrainingArguments) -> dict:
    """`from_pretrained` arguments loading the language model in `model_args.bits` bits; none for 16."""
    if model_args.bits == 16:
        return {}
    # bf16/fp16 as settled by _resolve_precision (fp16 on GPUs without bf16); fp32 when the recipe asks for neither
    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    config = bitsandbytes_config(
        model_args.bits, compute_dtype, quant_type=model_args.quant_type, double_quant=model_args.double_quant
    )
    return {
        "quantization_config": config,
        "dtype": compute_dtype,  # what the unquantized parts load in (transformers' default would be fp32)
        "device_map": {"": training_args.device},  # the whole model on this process's GPU, as DDP wants
    }


def build_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    progress_callback: TrainerCallback | None = None,
) -> LlavaExtTrainer:
    """Load the model (its language model in `model_args.bits` bits) and processor, freeze, add LoRA, and return a
    ready `LlavaExtTrainer`.

    Args:
        model_args (`ModelArguments`), data_args (`DataArguments`), training_args (`TrainingArguments`):
            as returned by `parse_config`.
        progress_callback (`TrainerCallback`, *optional*): shows the run's progress in place of Trainer's own
            (`ProgressCallback`'s bar, which writes each log on a line of its own, or with `disable_tqdm`
            `PrinterCallback`'s printed logs); a bare `TrainerCallback()` shows nothing.
    """
    if model_args.bits < 16:  # a machine that cannot run bitsandbytes is told before anything loads
        check_bitsandbytes_environment(model_args.bits)
        if training_args.use_cpu:
            raise ValueError(
                f"bits={model_args.bits} trains on the GPU with bitsandbytes but use_cpu is set; drop --use_cpu, "
                "or use bits: 16 to train on the CPU."
            )
    # The data first: a malformed record or an image outside image_folder stops the run before the model loads.
    datasets = [
        LlavaConversationDataset(
            path,
            data_args.image_folder,
            data_args.on_bad_sample,
            allow_images_outside_folder=data_args.allow_images_outside_folder,
        )
        if path is not None
        else None
        for path in (data_args.data_path, data_args.eval_data_path)
    ]
    model_path = _local_or_hub(model_args.model_name_or_path)
    processor_path = model_args.processor_name_or_path or model_path
    if Path(model_path).is_dir():  # a truncated or missing file is named before anything loads
        check_checkpoint_files(model_path, processor=processor_path == model_path)
    if processor_path != model_path and Path(processor_path).is_dir():
        check_checkpoint_files(processor_path, weights=False, config_name=None, what="processor")
    processor = AutoProcessor.from_pretrained(processor_path, trust_remote_code=model_args.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, trust_remote_code=model_args.trust_remote_code, **_quantized_load_kwargs(model_args, training_args)
    )
    keep_used_weight_conversions(model)
    model.config.use_cache = False  # the cache is useless in training and wasteful with checkpointing
    if model_args.bits < 16:
        # PEFT's QLoRA preparation: freezes every parameter and upcasts the unquantized ones (norms, vision tower,
        # projector, lm_head) to fp32 for stable updates; freeze_parameters then unfreezes what the recipe trains.
        # Checkpointing is left to Trainer and the lines below, as in 16-bit runs, so the recipe's settings apply.
        _import_peft().prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    freeze_parameters(model, model_args)
    if getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing:
        # Checkpointed blocks whose inputs need no grad return outputs without grad when the embeddings are frozen
        # (LoRA, stage 1): "element 0 of tensors does not require grad".
        model.enable_input_require_grads()
    if model_args.lora_enable:
        model = apply_lora(model, model_args)

    max_length = data_args.model_max_length or processor.tokenizer.model_max_length
    max_length = None if max_length >= VERY_LARGE_MAX_LENGTH else max_length
    collator = LlavaExtDataCollator(processor, model_max_length=max_length, on_overlong=data_args.on_overlong)
    for dataset in datasets:
        if dataset is not None:  # the length estimate for group_by_length counts the model's image tokens
            dataset.tokens_per_image = getattr(model.config, "image_seq_length", dataset.tokens_per_image)
    training_args.remove_unused_columns = False  # items are conversations; the collator makes the model inputs
    if data_args.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"
    trainer = LlavaExtTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        processing_class=processor,  # saved into every checkpoint, so each one loads with AutoProcessor
    )
    if progress_callback is not None:  # Trainer.__init__ added one of these two; a second display would draw twice
        trainer.pop_callback(PrinterCallback if training_args.disable_tqdm else default_progress_callback())
        trainer.add_callback(progress_callback)
    return trainer


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    progress_callback: TrainerCallback | None = None,
) -> TrainOutput:
    """Run a training job and save the final model (or LoRA adapter) and processor in `output_dir`.

    `training_args.resume_from_checkpoint` may be a checkpoint folder, or `"last"` / `"true"` for the newest
    `checkpoint-N` in `output_dir`. `progress_callback` replaces Trainer's progress display, as in `build_trainer`.

    Returns:
        transformers' `TrainOutput` (global step, training loss, metrics; `metrics["train_skipped_samples"]` counts
        the samples `on_bad_sample="skip"` left out, see `LlavaExtTrainer`).
    """
    trainer = build_trainer(model_args, data_args, training_args, progress_callback)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("last", "true"):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint={training_args.resume_from_checkpoint!r} but {training_args.output_dir!r} "
                "has no checkpoint-N folder; drop the option to start fresh or give a checkpoint path."
            )
    output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)  # model or adapter, processor, and the model's code files
    trainer.save_state()
    return output


def merge_lora(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Fold a LoRA adapter (with its projector) into its base model and save a full checkpoint with the processor.

    The adapter's and a local base model's files are checked before anything loads, and the checkpoint is written
    into a temporary sibling of `output_dir` that is renamed into place only when complete, as `llava-ext convert`
    writes (`convert.io.atomic_directory`).

    The base loads unquantized, in the dtype it was saved in, also for a QLoRA run (`bits: 4`/`8`): the adapter is
    folded into the 16-bit weights the run quantized on the fly, not into 4-bit ones. A base saved quantized is refused.

    Args:
        adapter_dir (`str`): a folder written by a LoRA or QLoRA run (final or `checkpoint-N`).
        output_dir (`str`): where the merged checkpoint goes; must not exist unless `overwrite=True`.
        base_model (`str`, *optional*): the base checkpoint; defaults to the adapter's `base_model_name_or_path`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir` once the merged
            checkpoint is complete.

    Returns:
        `output_dir`.
    """
    peft = _import_peft()
    PeftConfig, PeftModel = peft.PeftConfig, peft.PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} has no adapter_config.json; give the output_dir (or a checkpoint-N) of a run "
            "with lora_enable: true."
        )
    check_checkpoint_files(adapter_dir, config_name="adapter_config.json", what="LoRA adapter")
    out = Path(output_dir).expanduser().absolute()
    check_output_free(out, overwrite)
    if base_model is None:
        base_model = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
        recorded = Path(base_model).expanduser()
        if (recorded.is_absolute() or base_model.startswith(".")) and not recorded.is_dir():
            raise FileNotFoundError(
                f"The base model {base_model!r} recorded in {Path(adapter_dir) / 'adapter_config.json'} does not "
                "exist (moved or deleted?); pass it with base_model (--base-model)."
            )
    if Path(base_model).expanduser().is_dir():
        check_checkpoint_files(Path(base_model).expanduser(), processor=False, what="base model")
    quantization = getattr(AutoConfig.from_pretrained(base_model, trust_remote_code=True), "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise ValueError(
            f"The base model {base_model!r} is saved quantized ({method}), and merging the adapter into rounded "
            "weights would lose precision; pass its 16-bit checkpoint with base_model (--base-model)."
        )
    processor = AutoProcessor.from_pretrained(adapter_dir, trust_remote_code=True)
    # "auto": the dtype the base was saved in (transformers' default would be fp32, doubling a bf16 checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(base_model, trust_remote_code=True, dtype="auto")
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return str(output_dir)


__all__ = [
    "DataArguments",
    "LlavaExtTrainer",
    "ModelArguments",
    "apply_lora",
    "build_trainer",
    "freeze_parameters",
    "lora_target_regex",
    "merge_lora",
    "parse_config",
    "train",
]
