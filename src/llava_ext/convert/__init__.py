"""Checkpoint conversion: original LLaVA and llava-hf checkpoints -> llava_ext, llava_ext -> stock transformers llava.

    convert_checkpoint(SRC, OUT)   original LLaVA (`LlavaLlamaForCausalLM` + a separate CLIP tower) or llava-hf
                                   (`llava`) -> `llava_ext` with its code attached (loads with trust_remote_code=True)
    export_checkpoint(SRC, OUT)    `llava_ext` -> stock `llava` (no remote code) for `LlavaForConditionalGeneration`
    push_to_hub(OUT, REPO_ID)      one commit with the whole directory

Every writer first checks the source's files (`io.check_checkpoint_files`: a truncated or missing file is named
before any work), then streams tensors (see `io.py`) into a temporary sibling of OUT that is renamed into place only
when complete, so a failure, Ctrl-C or SIGKILL never leaves a half-written OUT (a killed run's sibling is removed by
the next run over the same OUT). The `llava-ext convert` / `llava-ext export` subcommands are thin wrappers
registered through `add_parser`.
"""

import argparse
import math
import os
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import (
    AddedToken,
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from ..compat import custom_object_save
from ..configuration_llava_ext import LlavaExtConfig
from ..image_processing_llava_ext import LlavaExtImageProcessor
from ..modeling_llava_ext import AUTO_MAP, LlavaExtForConditionalGeneration
from ..processing_llava_ext import LlavaExtProcessor
from ..vision import num_image_features
from .io import PlannedTensor, TensorSource, atomic_directory, check_checkpoint_files, check_output_free, read_json
from .io import resolve_source, write_sharded_safetensors
from .original import (
    CLIP_TO_HF,
    ORIGINAL_TO_HF,
    SELECT_FEATURE_TO_STRATEGY,
    SUPPORTED_PROJECTORS,
    expected_keys,
    original_text_model_type,
    rename_key,
)
from .refresh import refresh_checkpoint_code

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VOCAB_MULTIPLE = 64  # transformers' convert_llava_weights_to_hf pads the resized vocabulary to a multiple of 64
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
CHAT_TEMPLATE = "llava-1.5"
# image_aspect_ratio of an original config -> LlavaImageProcessor's do_pad (pad to a square in the mean colour)
ASPECT_RATIO_TO_DO_PAD = {"pad": True, "square": False, None: False}
# keys of a saved image processor that name classes rather than settings
IMAGE_PROCESSOR_CLASS_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class", "auto_map")
EMBEDDING_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
Layout = Literal["original", "llava-hf", "llava_ext"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ description }}

## Usage

```python
{{ usage }}
```
"""
USAGE_REMOTE_CODE = """import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{repo}"
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=torch.float16)
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in this image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("image.jpg"), text=prompt, return_tensors="pt").to(model.device, torch.float16)
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))"""


# ----------------------------------------------------------------------------------------------------------- convert
def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    dtype: Literal["float16", "bfloat16", "float32"] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    base_model: str | None = None,
    push_to_hub_repo: str | None = None,
    private: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert an original LLaVA or llava-hf checkpoint into a self-contained `llava_ext` checkpoint.

    Args:
        src (`str` or `os.PathLike`): a local checkpoint directory or a Hub repo id.
        out (`str` or `os.PathLike`): the output directory; must not exist unless `overwrite=True`.
        vision_tower (`str` or `os.PathLike`, *optional*): for original checkpoints, the CLIP directory or repo id;
            overrides the config's `mm_vision_tower`.
        dtype (`str`, *optional*): cast floating-point weights to `"float16"`, `"bfloat16"` or `"float32"`; by default
            each tensor keeps its stored dtype.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): shard the weights past this size.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out` once the new one is complete.
        base_model (`str`, *optional*): Hub id named as the base model in the model card; defaults to `src` when that
            is a Hub id.
        push_to_hub_repo (`str`, *optional*): upload the result to this Hub repo (see `push_to_hub`).
        private (`bool`, *optional*, defaults to `False`): create the Hub repo private.
        revision (`str`, *optional*): the Hub branch to push to.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over tensors.

    Returns:
        `Path`: the output directory. It holds config.json with `auto_map` and the model's .py files, safetensors
        weights (sharded with an index past `max_shard_size`), the tokenizer, the processor and image-processor
        configs, the chat template and a model card.
    """
    out = Path(out).expanduser().absolute()
    check_output_free(out, overwrite)  # before any download or heavy work
    dtype = _parse_dtype(dtype)
    src_dir = resolve_source(src)
    check_checkpoint_files(src_dir)  # a truncated or missing file is named now, not midway through writing
    layout = detect_layout(read_json(src_dir / "config.json"), src_dir)
    if layout == "original":
        config, processor, plan = _plan_original(src_dir, vision_tower, dtype)
    else:
        config, processor, plan = _plan_llava_hf(src_dir, dtype)
    base_model = base_model or (None if Path(src).expanduser().exists() else str(src))

    with atomic_directory(out, overwrite) as tmp:
        write_sharded_safetensors(plan, tmp, max_shard_size=max_shard_size, progress=progress)
        config.dtype = _dominant_dtype(plan)
        _save_remote_code_config(config, tmp)
        _copy_generation_config(src_dir, tmp)
        processor.save_pretrained(tmp)
        description = (
            f"LLaVA converted from the {'original LLaVA' if layout == 'original' else layout} checkpoint "
            f"`{base_model or Path(src).name}` to `llava_ext` with `llava-ext convert`. The model "
            "code ships with the checkpoint: load it with `trust_remote_code=True`."
        )
        _model_card(base_model, out.name, description, USAGE_REMOTE_CODE).save(tmp / "README.md")
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, private=private, revision=revision)
    return out


def detect_layout(config: dict, src_dir: Path | str = "the checkpoint") -> Layout:
    """'original' (haotian-liu LLaVA), 'llava-hf' (transformers' `llava`) or 'llava_ext', from a config.json dict."""
    if original_text_model_type(config) is not None:
        return "original"
    if config.get("model_type") == "llava" and "text_config" in config:
        return "llava-hf"
    if config.get("model_type") == "llava_ext":
        return "llava_ext"
    raise ValueError(
        f"{src_dir} is not a LLaVA checkpoint this tool converts: config.json has model_type="
        f"{config.get('model_type')!r}, architectures={config.get('architectures')}. Supported: original LLaVA "
        f"({', '.join(['LlavaLlamaForCausalLM', 'LlavaMistralForCausalLM'])}) and transformers' 'llava'."
    )


def _plan_original(src_dir: Path, vision_tower: str | os.PathLike | None, dtype: torch.dtype | None):
    """Config, processor and tensor plan for an original LLaVA checkpoint (see `original.py` for the key tables)."""
    original = read_json(src_dir / "config.json")  # model_type "llava" but not transformers' layout: read as JSON
    projector = original.get("mm_projector_type", "linear")  # the original code's default
    if projector not in SUPPORTED_PROJECTORS:
        raise ValueError(
            f"mm_projector_type={projector!r} in {src_dir / 'config.json'} is unsupported; llava_ext converts "
            f"{', '.join(SUPPORTED_PROJECTORS)} (LLaVA-1.5's two-layer GELU MLP)."
        )
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ValueError(
            f"mm_vision_select_feature={select_feature!r} is unsupported; choose one of "
            f"{sorted(SELECT_FEATURE_TO_STRATEGY)}."
        )
    aspect_ratio = original.get("image_aspect_ratio")
    if aspect_ratio not in ASPECT_RATIO_TO_DO_PAD:
        raise ValueError(
            f"image_aspect_ratio={aspect_ratio!r} is unsupported (anyres is LLaVA-NeXT); LLaVA-1.5 uses 'pad' or "
            "'square'."
        )
    tower_source = vision_tower or original.get("mm_vision_tower")
    if not tower_source:
        raise ValueError(f"{src_dir / 'config.json'} names no mm_vision_tower; pass the CLIP tower (--vision-tower).")
    tower_dir = resolve_source(tower_source, what="vision tower")
    check_checkpoint_files(tower_dir, processor=False, what="vision tower")
    vision_config = _clip_vision_config(tower_dir)

    text_type = original_text_model_type(original)
    text_fields = set(AutoConfig.for_model(text_type).to_dict()) | {"rope_theta", "rope_scaling"}
    text_fields -= {"architectures", "model_type", "_name_or_path", "transformers_version", "dtype"}
    text_config = AutoConfig.for_model(text_type, **{k: v for k, v in original.items() if k in text_fields})

    # Tensors: the LLM checkpoint, and the CLIP tower unless the checkpoint carries a (fine-tuned) one itself.
    llm = TensorSource(src_dir)
    renamed = _rename_all(llm, ORIGINAL_TO_HF, f"original LLaVA checkpoint {src_dir}")
    if not any(target.startswith("vision_tower.") for target in renamed):
        renamed.update(_rename_all(TensorSource(tower_dir), CLIP_TO_HF, f"vision tower {tower_dir}"))
    expected = expected_keys(ORIGINAL_TO_HF, text_config.num_hidden_layers, "language_model.")
    expected |= expected_keys(ORIGINAL_TO_HF, 0, "multi_modal_projector.")
    expected |= expected_keys(CLIP_TO_HF, vision_config.num_hidden_layers, "vision_tower.")
    if text_config.tie_word_embeddings:
        expected.discard("language_model.lm_head.weight")
    missing = sorted(expected - set(renamed))
    if missing:
        raise ValueError(
            f"The checkpoint {src_dir} (with vision tower {tower_dir}) lacks {len(missing)} weights, e.g. "
            f"{missing[:5]}; is it complete (all shards downloaded) and a LLaVA-1.5 checkpoint?"
        )

    # Tokenizer: add <image> (and <pad>), keep BOS/EOS handling, pad the vocabulary to a multiple of 64.
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    old_vocab = llm.meta("model.embed_tokens.weight").shape[0]
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:  # llava-1.5 pads with <unk>
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    new_vocab = math.ceil(max(len(tokenizer), old_vocab) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text_config.vocab_size = new_vocab
    text_config.pad_token_id = tokenizer.pad_token_id

    strategy = SELECT_FEATURE_TO_STRATEGY[select_feature]
    config = LlavaExtConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",  # mlp2x_gelu
        vision_feature_select_strategy=strategy,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        image_seq_length=num_image_features(vision_config, *(vision_config.image_size,) * 2, strategy),
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    config.pad_token_id = tokenizer.pad_token_id

    image_settings = {k: v for k, v in read_json(tower_dir / "preprocessor_config.json").items()
                      if k not in IMAGE_PROCESSOR_CLASS_KEYS}
    image_settings["do_pad"] = ASPECT_RATIO_TO_DO_PAD[aspect_ratio]
    processor = _build_processor(
        tokenizer,
        image_settings,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    plan = {}
    for target, (source, key) in renamed.items():
        rows = new_vocab if target in EMBEDDING_KEYS else None
        plan[target] = _planned(source, key, dtype, rows=rows)
    return config, processor, plan


def _plan_llava_hf(src_dir: Path, dtype: torch.dtype | None):
    """Config, processor and tensor plan for a transformers `llava` (or `llava_ext`) checkpoint: keys unchanged."""
    config = LlavaExtConfig.from_pretrained(src_dir)
    source_processor = AutoProcessor.from_pretrained(src_dir)
    image_settings = {k: v for k, v in source_processor.image_processor.to_dict().items()
                      if k not in IMAGE_PROCESSOR_CLASS_KEYS}
    processor = _build_processor(
        source_processor.tokenizer,
        image_settings,
        patch_size=source_processor.patch_size or config.vision_config.patch_size,
        vision_feature_select_strategy=(
            source_processor.vision_feature_select_strategy or config.vision_feature_select_strategy
        ),
        num_additional_image_tokens=source_processor.num_additional_image_tokens,
        chat_template=source_processor.chat_template or CHAT_TEMPLATE,
        image_token=source_processor.image_token,
    )
    source = TensorSource(src_dir)
    return config, processor, {key: _planned(source, key, dtype) for key in source.keys()}


def _rename_all(source: TensorSource, table: dict, description: str) -> dict[str, tuple[TensorSource, str]]:
    """{new name: (source, old name)} for every kept key; an unknown or doubly-mapped key is an error."""
    renamed = {}
    for key in source.keys():
        target = rename_key(key, table, description)
        if target is None:
            continue
        if target in renamed:
            raise ValueError(f"{key!r} and {renamed[target][1]!r} in the {description} both convert to {target!r}.")
        renamed[target] = (source, key)
    return renamed


def _planned(source: TensorSource, key: str, dtype: torch.dtype | None, rows: int | None = None) -> PlannedTensor:
    """Plan `source[key]` cast to `dtype` (floating tensors only) and, for embeddings, grown to `rows` rows."""
    meta = source.meta(key)
    out_dtype = dtype if dtype is not None and meta.is_floating_point() else meta.dtype
    shape = (rows, *meta.shape[1:]) if rows is not None else tuple(meta.shape)

    def make() -> torch.Tensor:
        tensor = source.get(key)
        if rows is not None and rows > tensor.shape[0]:
            tensor = _grow_rows(tensor, rows)
        return tensor.to(out_dtype)

    return PlannedTensor(torch.empty(shape, dtype=out_dtype, device="meta"), make)


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean row (new tokens start at the average embedding): (rows, hidden)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, hidden)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])  # (rows, hidden)


def _clip_vision_config(tower_dir: Path) -> CLIPVisionConfig:
    """The vision config of a CLIPModel or CLIPVisionModel directory."""
    model_type = read_json(tower_dir / "config.json").get("model_type")
    if model_type == "clip":
        return CLIPConfig.from_pretrained(tower_dir).vision_config
    if model_type == "clip_vision_model":
        return CLIPVisionConfig.from_pretrained(tower_dir)
    raise ValueError(
        f"The vision tower {tower_dir} has model_type={model_type!r}; original LLaVA-1.5 checkpoints use CLIP "
        "('clip' or 'clip_vision_model')."
    )


def _build_processor(tokenizer, image_settings: dict, chat_template: str | None = CHAT_TEMPLATE, **processor_kwargs):
    """A `LlavaExtProcessor` (saved with its code) of `tokenizer` and `LlavaExtImageProcessor(**image_settings)`."""
    return LlavaExtProcessor(
        image_processor=LlavaExtImageProcessor(**image_settings),
        tokenizer=tokenizer,
        chat_template=chat_template,
        **processor_kwargs,
    )


def _save_remote_code_config(config: LlavaExtConfig, out_dir: Path) -> None:
    """config.json with `auto_map`, and the model's .py files, as `save_pretrained` writes them (weights aside)."""
    with torch.device("meta"):  # only the class and its module are needed: no memory, no init
        model = LlavaExtForConditionalGeneration(config)
    config.architectures = [type(model).__name__]
    config.auto_map = dict(AUTO_MAP)  # every Auto class, as LlavaExtPreTrainedModel.save_pretrained writes it
    custom_object_save(model, out_dir)  # the .py files: modeling_llava_ext.py and its sibling imports
    config.save_pretrained(out_dir)


def _copy_generation_config(src_dir: Path, out_dir: Path) -> None:
    if (src_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src_dir).save_pretrained(out_dir)


def _dominant_dtype(plan: dict[str, PlannedTensor]) -> str:
    """The dtype holding most floating-point parameters, as config.json's `dtype` string."""
    counts = {}
    for planned in plan.values():
        if planned.meta.is_floating_point():
            counts[planned.meta.dtype] = counts.get(planned.meta.dtype, 0) + planned.meta.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def _model_card(base_model: str | None, name: str, description: str, usage: str) -> ModelCard:
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        tags=["llava", "llava_ext", "image-text-to-text"],
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=name,
        description=description,
        usage=usage.format(repo=name),
    )


# ------------------------------------------------------------------------------------------------------------ export
def export_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: Literal["float16", "bfloat16", "float32"] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a `llava_ext` checkpoint in transformers' stock `llava` layout: no remote code, no `auto_map`.

    Args:
        src (`str` or `os.PathLike`): a `llava_ext` checkpoint directory or Hub repo id.
        out (`str` or `os.PathLike`): the output directory; must not exist unless `overwrite=True`.
        dtype (`str`, *optional*): cast floating-point weights to `"float16"`, `"bfloat16"` or `"float32"`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): shard the weights past this size.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out` once the new one is complete.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over tensors.

    Returns:
        `Path`: the output directory, loadable by `LlavaForConditionalGeneration` and `AutoProcessor` without llava_ext.
    """
    out = Path(out).expanduser().absolute()
    check_output_free(out, overwrite)
    dtype = _parse_dtype(dtype)
    src_dir = resolve_source(src)
    check_checkpoint_files(src_dir)
    config_dict = read_json(src_dir / "config.json")
    if config_dict.get("model_type") not in ("llava_ext", "llava"):
        raise ValueError(
            f"{src_dir} has model_type={config_dict.get('model_type')!r}; `export` takes a llava_ext checkpoint "
            "(convert an original LLaVA checkpoint with `llava-ext convert` first)."
        )
    stock_config = LlavaConfig.from_dict({k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type")})
    stock_config.architectures = ["LlavaForConditionalGeneration"]
    source_processor = AutoProcessor.from_pretrained(src_dir)
    source_processor.tokenizer.init_kwargs.pop("auto_map", None)  # it names LlavaExtProcessor: stock has no code
    image_settings = {k: v for k, v in source_processor.image_processor.to_dict().items()
                      if k not in IMAGE_PROCESSOR_CLASS_KEYS and k in LlavaImageProcessorPil().to_dict()}
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**image_settings),
        tokenizer=source_processor.tokenizer,
        patch_size=source_processor.patch_size,
        vision_feature_select_strategy=source_processor.vision_feature_select_strategy,
        chat_template=source_processor.chat_template,
        image_token=source_processor.image_token,
        num_additional_image_tokens=source_processor.num_additional_image_tokens,
    )
    source = TensorSource(src_dir)
    plan = {key: _planned(source, key, dtype) for key in source.keys()}

    with atomic_directory(out, overwrite) as tmp:
        write_sharded_safetensors(plan, tmp, max_shard_size=max_shard_size, progress=progress)
        stock_config.dtype = _dominant_dtype(plan)
        stock_config.save_pretrained(tmp)
        _copy_generation_config(src_dir, tmp)
        processor.save_pretrained(tmp)
        usage = USAGE_REMOTE_CODE.replace(", trust_remote_code=True", "")
        description = "LLaVA exported from a llava_ext checkpoint to transformers' stock `llava` layout."
        _model_card(None, out.name, description, usage).save(tmp / "README.md")
    return out


# --------------------------------------------------------------------------------------------------------------- hub
def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Upload a converted directory to the Hub in one commit (`HfApi.create_repo` + `upload_folder`).

    Args:
        out_dir (`str` or `os.PathLike`): the directory to upload.
        repo_id (`str`): the model repo, `owner/name`; created if missing.
        private (`bool`, *optional*, defaults to `False`): create the repo private (an existing repo keeps its setting).
        revision (`str`, *optional*): the branch to commit to, created from main if missing.
        commit_message (`str`, *optional*): defaults to "Upload <dir name> with llava-ext".
        token (`str`, *optional*): defaults to `HF_TOKEN` or the stored `hf auth login` token.

    Returns:
        huggingface_hub's `CommitInfo` of the upload.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        raise FileNotFoundError(f"{out_dir} holds no config.json; convert or export a checkpoint into it first.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=out_dir,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {out_dir.name} with llava-ext",
    )


# --------------------------------------------------------------------------------------------------------------- cli
CONVERT_EXAMPLE = (
    "example:\n  llava-ext convert liuhaotian/llava-v1.5-7b ./llava-v1.5-7b-ext "
    "--vision-tower openai/clip-vit-large-patch14-336 --dtype float16 --push-to-hub me/llava-v1.5-7b-ext --private"
)
EXPORT_EXAMPLE = "example:\n  llava-ext export ./llava-v1.5-7b-ext ./llava-v1.5-7b-stock --dtype float16"
REFRESH_CODE_EXAMPLE = (
    "example:\n  llava-ext refresh-code me/llava-v1.5-7b-ext --output-dir ./llava-v1.5-7b-ext "
    "--push-to-hub me/llava-v1.5-7b-ext --revision refresh-code"
)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


def add_parser(subparsers) -> None:
    """Add the `convert`, `export` and `refresh-code` subcommands to the `llava-ext` CLI."""
    convert = subparsers.add_parser(
        "convert",
        help="convert an original LLaVA or llava-hf checkpoint to llava_ext",
        description="Convert an original LLaVA (haotian-liu) or llava-hf checkpoint into a llava_ext checkpoint "
        "that loads with trust_remote_code=True. Writing is atomic: OUT appears only when complete.",
        epilog=CONVERT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint directory or Hub repo id")
    convert.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    convert.add_argument("--vision-tower", metavar="DIR", help="CLIP tower directory or repo id (original format)")
    convert.add_argument("--base-model", metavar="REPO_ID", help="base model named in the model card")
    _add_writing_arguments(convert)
    _add_push_arguments(convert, "upload the result to this Hub repo")
    convert.set_defaults(func=_run_convert)

    export = subparsers.add_parser(
        "export",
        help="export a llava_ext checkpoint to transformers' stock llava layout",
        description="Write a llava_ext checkpoint as a stock transformers 'llava' checkpoint (no remote code).",
        epilog=EXPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("src", metavar="SRC", help="llava_ext checkpoint directory or Hub repo id")
    export.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    _add_writing_arguments(export)
    export.set_defaults(func=_run_export)

    refresh = subparsers.add_parser(
        "refresh-code",
        help="update the code shipped inside a llava_ext checkpoint to this llava_ext",
        description="Replace the llava_ext code inside a checkpoint (its .py files and the auto_map entries naming\n"
        "them) with the installed llava_ext's, so it loads with trust_remote_code=True on newer transformers.\n"
        "Weights and every other file are kept as they are. In place, the refreshed directory (unchanged files\n"
        "hard-linked) replaces the original only when complete; a Hub repo needs --output-dir or --push-to-hub.",
        epilog=REFRESH_CODE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    refresh.add_argument("checkpoint", metavar="CHECKPOINT", help="llava_ext checkpoint directory or Hub repo id")
    refresh.add_argument("--output-dir", metavar="OUT", help="write a refreshed copy here instead of in place")
    refresh.add_argument("--overwrite", action="store_true", help="replace an existing OUT once the new one is done")
    _add_push_arguments(refresh, "upload the refreshed checkpoint to this Hub repo")
    refresh.set_defaults(func=_run_refresh_code)


def _add_push_arguments(parser: argparse.ArgumentParser, push_help: str) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help=push_help)
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", metavar="R", help="Hub branch to push to")


def _add_writing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard weights past this size (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT once the new one is done")


def _run_convert(args: argparse.Namespace) -> int:
    try:
        convert_checkpoint(
            args.src, args.out, vision_tower=args.vision_tower, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, base_model=args.base_model, push_to_hub_repo=args.push_to_hub,
            private=args.private, revision=args.revision,
        )
    except USER_ERRORS as error:
        raise SystemExit(f"llava-ext convert: error: {error}") from None
    return 0


def _run_export(args: argparse.Namespace) -> int:
    try:
        export_checkpoint(
            args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
    except USER_ERRORS as error:
        raise SystemExit(f"llava-ext export: error: {error}") from None
    return 0


def _run_refresh_code(args: argparse.Namespace) -> int:
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
    "convert_checkpoint",
    "detect_layout",
    "export_checkpoint",
    "push_to_hub",
    "refresh_checkpoint_code",
]
