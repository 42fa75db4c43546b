"""Original LLaVA and llava-hf checkpoints -> `llava_ext` (`convert_checkpoint`, the `llava-ext convert` command).

An original checkpoint's keys are renamed with the tables of `original.py` and its CLIP tower is read from its own
directory; a llava-hf (transformers `llava`, `llava_next` or `llava_onevision`) checkpoint keeps its keys, in
whichever of the stock layouts it was saved (the model classes load each of them). Either way the tokenizer gains `<image>` (and
`<pad>`), the vocabulary is padded as transformers' own conversion script pads it, and the result is written with the
model's code attached, so it loads with `trust_remote_code=True`.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AddedToken, AutoConfig, AutoProcessor, AutoTokenizer, CLIPConfig, CLIPVisionConfig
from transformers import LlavaOnevisionProcessor, logging

from ..compat import AutoImageProcessor, custom_object_save
from ..configuration_llava_ext import LlavaExtConfig
from ..configuration_llava_ext_next import LlavaExtNextConfig
from ..configuration_llava_ext_onevision import LlavaExtOnevisionConfig
from ..image_processing_llava_ext import LlavaExtImageProcessor
from ..image_processing_llava_ext_next import LlavaExtNextImageProcessor
from ..image_processing_llava_ext_onevision import LlavaExtOnevisionImageProcessor
from ..modeling_llava_ext import AUTO_MAP, LlavaExtForConditionalGeneration
from ..modeling_llava_ext_next import NEXT_AUTO_MAP, LlavaExtNextForConditionalGeneration
from ..modeling_llava_ext_onevision import ONEVISION_AUTO_MAP, LlavaExtOnevisionForConditionalGeneration
from ..processing_llava_ext import LlavaExtProcessor
from ..processing_llava_ext_next import DEFAULT_NEXT_CHAT_TEMPLATE, LlavaExtNextProcessor
from ..processing_llava_ext_onevision import DEFAULT_ONEVISION_CHAT_TEMPLATE, LlavaExtOnevisionProcessor
from ..vision import num_image_features
from .hub import USAGE_REMOTE_CODE, model_card, push_to_hub
from .io import TensorSource, atomic_directory, check_checkpoint_files, check_output_free, read_json
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
from .plan import copy_generation_config, dominant_dtype, image_processor_settings, parse_dtype, planned_tensor

logger = logging.get_logger(__name__)

VOCAB_MULTIPLE = 64  # transformers' convert_llava_weights_to_hf pads the resized vocabulary to a multiple of 64
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
CHAT_TEMPLATE = "llava-1.5"
# image_aspect_ratio of an original config -> LlavaImageProcessor's do_pad (pad to a square in the mean colour)
ASPECT_RATIO_TO_DO_PAD = {"pad": True, "square": False, None: False}
EMBEDDING_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
Layout = Literal["original", "llava-hf", "llava_ext"]


@dataclass(frozen=True)
class Family:
    """What a llava-hf or llava_ext checkpoint of one model family converts into."""

    config: type
    model: type
    auto_map: dict
    processor: type
    image_processor: type
    chat_template: str  # for a source processor without one


LLAVA = Family(LlavaExtConfig, LlavaExtForConditionalGeneration, AUTO_MAP, LlavaExtProcessor, LlavaExtImageProcessor,
               CHAT_TEMPLATE)
NEXT = Family(LlavaExtNextConfig, LlavaExtNextForConditionalGeneration, NEXT_AUTO_MAP, LlavaExtNextProcessor,
              LlavaExtNextImageProcessor, DEFAULT_NEXT_CHAT_TEMPLATE)
ONEVISION = Family(LlavaExtOnevisionConfig, LlavaExtOnevisionForConditionalGeneration, ONEVISION_AUTO_MAP,
                   LlavaExtOnevisionProcessor, LlavaExtOnevisionImageProcessor, DEFAULT_ONEVISION_CHAT_TEMPLATE)
# config.json's model_type -> its family: transformers' own (llava-hf) and ours (llava_ext)
FAMILIES = {
    "llava": LLAVA, "llava_ext": LLAVA, "llava_next": NEXT, "llava_ext_next": NEXT,
    "llava_onevision": ONEVISION, "llava_ext_onevision": ONEVISION,
}
STOCK_TYPES = ("llava", "llava_next", "llava_onevision")


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
    dtype = parse_dtype(dtype)
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
        config.dtype = dominant_dtype(plan)
        _save_remote_code_config(config, tmp)
        copy_generation_config(src_dir, tmp)
        processor.save_pretrained(tmp)
        description = (
            f"LLaVA converted from the {'original LLaVA' if layout == 'original' else layout} checkpoint "
            f"`{base_model or Path(src).name}` to `llava_ext` with `llava-ext convert`. The model "
            "code ships with the checkpoint: load it with `trust_remote_code=True`."
        )
        model_card(base_model, out.name, description, USAGE_REMOTE_CODE).save(tmp / "README.md")
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, private=private, revision=revision)
    return out


def detect_layout(config: dict, src_dir: Path | str = "the checkpoint") -> Layout:
    """'original' (haotian-liu LLaVA), 'llava-hf' (transformers' `llava`) or 'llava_ext', from a config.json dict."""
    if original_text_model_type(config) is not None:
        return "original"
    if config.get("model_type") in STOCK_TYPES and "text_config" in config:
        return "llava-hf"
    if config.get("model_type") in FAMILIES:
        return "llava_ext"
    raise ValueError(
        f"{src_dir} is not a LLaVA checkpoint this tool converts: config.json has model_type="
        f"{config.get('model_type')!r}, architectures={config.get('architectures')}. Supported: original LLaVA "
        f"({', '.join(['LlavaLlamaForCausalLM', 'LlavaMistralForCausalLM'])}) and transformers' 'llava', "
        "'llava_next' and 'llava_onevision'."
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

    image_settings = image_processor_settings(read_json(tower_dir / "preprocessor_config.json"))
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
        plan[target] = planned_tensor(source, key, dtype, rows=rows)
    return config, processor, plan


def _plan_llava_hf(src_dir: Path, dtype: torch.dtype | None):
    """Config, processor and tensor plan for a transformers `llava` / `llava_next` / `llava_onevision` (or a
    `llava_ext` family's) checkpoint: keys unchanged."""
    model_type = read_json(src_dir / "config.json")["model_type"]
    family = FAMILIES[model_type]
    config = family.config.from_pretrained(src_dir)
    if model_type == "llava_onevision":
        return config, _onevision_processor(src_dir, config), _plan_unchanged(src_dir, dtype)
    source_processor = AutoProcessor.from_pretrained(src_dir)
    processor = _build_processor(
        source_processor.tokenizer,
        image_processor_settings(source_processor.image_processor.to_dict()),
        patch_size=source_processor.patch_size or config.vision_config.patch_size,
        vision_feature_select_strategy=(
            source_processor.vision_feature_select_strategy or config.vision_feature_select_strategy
        ),
        num_additional_image_tokens=source_processor.num_additional_image_tokens,
        chat_template=source_processor.chat_template or family.chat_template,
        image_token=source_processor.image_token,
        family=family,
    )
    return config, processor, _plan_unchanged(src_dir, dtype)


def _plan_unchanged(src_dir: Path, dtype: torch.dtype | None) -> dict:
    source = TensorSource(src_dir)
    return {key: planned_tensor(source, key, dtype) for key in source.keys()}


def _onevision_processor(src_dir: Path, config: LlavaExtOnevisionConfig) -> LlavaExtOnevisionProcessor:
    """Our processor made of a llava-hf `llava_onevision` checkpoint's processor files, read with transformers'
    readers (`get_processor_dict`: processor_config.json and the chat template; the image processor's and the
    tokenizer's own), without building `LlavaOnevisionProcessor`, whose video processor needs torchvision."""
    processor_dict, _ = LlavaOnevisionProcessor.get_processor_dict(str(src_dir))
    image_processor = AutoImageProcessor.from_pretrained(src_dir)
    tile = config.vision_config.image_size
    patch_size = config.vision_config.patch_size
    num_image_tokens = processor_dict.get("num_image_tokens")
    if num_image_tokens is not None and num_image_tokens != (tile // patch_size) ** 2:
        logger.warning(
            f"{src_dir / 'processor_config.json'} has num_image_tokens={num_image_tokens}, but the vision tower "
            f"({tile}px, patch {patch_size}) gives {(tile // patch_size) ** 2} per crop; the converted processor "
            "counts what the model computes."
        )
    return _build_processor(
        AutoTokenizer.from_pretrained(src_dir),
        image_processor_settings(image_processor.to_dict()),
        patch_size=patch_size,
        vision_feature_select_strategy=(
            processor_dict.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        ),
        chat_template=processor_dict.get("chat_template") or ONEVISION.chat_template,
        image_token=processor_dict.get("image_token", "<image>"),
        video_token=processor_dict.get("video_token", "<video>"),
        vision_aspect_ratio=processor_dict.get("vision_aspect_ratio") or config.vision_aspect_ratio,
        family=ONEVISION,
    )


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


def _build_processor(
    tokenizer, image_settings: dict, chat_template: str | None = CHAT_TEMPLATE, family: Family = LLAVA,
    **processor_kwargs,
):
    """The family's processor (`LlavaExtProcessor`, ...; saved with its code) of `tokenizer` and its image processor
    made of `image_settings`."""
    return family.processor(
        image_processor=family.image_processor(**image_settings),
        tokenizer=tokenizer,
        chat_template=chat_template,
        **processor_kwargs,
    )


def _save_remote_code_config(config: LlavaExtConfig, out_dir: Path) -> None:
    """config.json with `auto_map`, and the model's .py files, as `save_pretrained` writes them (weights aside)."""
    family = FAMILIES[config.model_type]
    with torch.device("meta"):  # only the class and its module are needed: no memory, no init
        model = family.model(config)
    config.architectures = [type(model).__name__]
    config.auto_map = dict(family.auto_map)  # every Auto class, as LlavaExtPreTrainedModel.save_pretrained writes it
    custom_object_save(model, out_dir)  # the .py files: modeling_llava_ext.py and its sibling imports
    config.save_pretrained(out_dir)


__all__ = ["Layout", "convert_checkpoint", "detect_layout"]
