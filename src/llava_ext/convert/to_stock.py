"""`llava_ext` -> transformers' stock layouts (`export_checkpoint`, the `llava-ext export` command).

Each llava_ext family exports to the transformers family it mirrors:

    llava_ext            -> llava            LlavaForConditionalGeneration            LlavaProcessor
    llava_ext_next       -> llava_next       LlavaNextForConditionalGeneration        LlavaNextProcessor
    llava_ext_onevision  -> llava_onevision  LlavaOnevisionForConditionalGeneration   LlavaOnevisionProcessor

The keys already are the stock family's; what changes is everything that names our code: config.json loses
`auto_map` and becomes the stock config, the processor files name transformers' processor classes, and no .py file is
written, so the result loads with transformers' own classes and `AutoProcessor` without llava_ext installed.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    logging,
)

from .hub import USAGE_STOCK, model_card
from .io import TensorSource, atomic_directory, check_output_free, read_llava_checkpoint, write_sharded_safetensors
from .plan import copy_generation_config, dominant_dtype, image_processor_settings, parse_dtype, planned_tensor

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class StockFamily:
    """The transformers family a llava_ext family exports to."""

    config_class: type
    architecture: str
    image_processor_class: type  # the PIL one: it needs no torchvision, and saves the family's image_processor_type
    processor_class: type | None  # None: written by hand (LlavaOnevisionProcessor needs torchvision to be built)


STOCK_FAMILIES = {
    "llava": StockFamily(LlavaConfig, "LlavaForConditionalGeneration", LlavaImageProcessorPil, LlavaProcessor),
    "llava_next": StockFamily(
        LlavaNextConfig, "LlavaNextForConditionalGeneration", LlavaNextImageProcessorPil, LlavaNextProcessor
    ),
    "llava_onevision": StockFamily(
        LlavaOnevisionConfig, "LlavaOnevisionForConditionalGeneration", LlavaOnevisionImageProcessorPil, None
    ),
}
# model_type in config.json -> the stock family it exports to (a stock checkpoint exports as itself)
EXPORT_MODEL_TYPES = {
    "llava_ext": "llava", "llava": "llava",
    "llava_ext_next": "llava_next", "llava_next": "llava_next",
    "llava_ext_onevision": "llava_onevision", "llava_onevision": "llava_onevision",
}
# LlavaOnevisionVideoProcessor's settings, read off the image processor (llava_ext resizes video frames with it)
VIDEO_SETTINGS = (
    "do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
    "image_std",
)


def export_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: Literal["float16", "bfloat16", "float32"] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a `llava_ext` checkpoint in its transformers family's stock layout: no remote code, no `auto_map`.

    `llava_ext` exports as `llava`, `llava_ext_next` as `llava_next`, `llava_ext_onevision` as `llava_onevision`
    (see the module docstring).

    Args:
        src (`str` or `os.PathLike`): a `llava_ext`, `llava_ext_next` or `llava_ext_onevision` checkpoint directory
            or Hub repo id, with its processor files.
        out (`str` or `os.PathLike`): the output directory; must not exist unless `overwrite=True`.
        dtype (`str`, *optional*): cast floating-point weights to `"float16"`, `"bfloat16"` or `"float32"`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): shard the weights past this size.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out` once the new one is complete.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over tensors.

    Returns:
        `Path`: the output directory, loadable by transformers' own class of the family (e.g.
        `LlavaNextForConditionalGeneration`) and `AutoProcessor` without llava_ext.
    """
    out = Path(out).expanduser().absolute()
    check_output_free(out, overwrite)
    dtype = parse_dtype(dtype)
    src_dir, config_dict = read_llava_checkpoint(src, "`export`", model_types=tuple(EXPORT_MODEL_TYPES))
    stock_type = EXPORT_MODEL_TYPES[config_dict["model_type"]]
    family = STOCK_FAMILIES[stock_type]
    stock_config = family.config_class.from_dict(
        {k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type")}
    )
    stock_config.architectures = [family.architecture]
    source_processor = AutoProcessor.from_pretrained(src_dir)
    source_processor.tokenizer.init_kwargs.pop("auto_map", None)  # it names our processor: stock has no code
    stock_keys = family.image_processor_class().to_dict()
    image_settings = {k: v for k, v in image_processor_settings(source_processor.image_processor.to_dict()).items()
                      if k in stock_keys}
    image_processor = family.image_processor_class(**image_settings)
    source = TensorSource(src_dir)
    plan = {key: planned_tensor(source, key, dtype) for key in source.keys()}

    with atomic_directory(out, overwrite) as tmp:
        write_sharded_safetensors(plan, tmp, max_shard_size=max_shard_size, progress=progress)
        stock_config.dtype = dominant_dtype(plan)
        stock_config.save_pretrained(tmp)
        copy_generation_config(src_dir, tmp)
        if family.processor_class is not None:
            family.processor_class(
                image_processor=image_processor,
                tokenizer=source_processor.tokenizer,
                patch_size=source_processor.patch_size,
                vision_feature_select_strategy=source_processor.vision_feature_select_strategy,
                chat_template=source_processor.chat_template,
                image_token=source_processor.image_token,
                num_additional_image_tokens=source_processor.num_additional_image_tokens,
            ).save_pretrained(tmp)
        else:
            _save_onevision_processor(tmp, source_processor, image_processor)
        description = f"LLaVA exported from a llava_ext checkpoint to transformers' stock `{stock_type}` layout."
        model_card(None, out.name, description, USAGE_STOCK).save(tmp / "README.md")
    return out


def _save_onevision_processor(out_dir: Path, source_processor, image_processor) -> None:
    """transformers' LlavaOnevisionProcessor files, in the split layout every 5.x release reads (llava-hf's on the
    Hub): preprocessor_config.json, video_preprocessor_config.json, processor_config.json, the tokenizer's files and
    chat_template.jinja. Written by hand: the stock processor cannot be built where torchvision (its video processor's
    backend) is not installed."""
    processor_class = "LlavaOnevisionProcessor"
    if source_processor.num_additional_image_tokens:
        logger.warning(
            f"The processor counts {source_processor.num_additional_image_tokens} extra token(s) per crop (a tower "
            "with a CLS token); transformers' LlavaOnevisionProcessor counts each crop as a square of patches only, so "
            "its prompts will be that many tokens off per crop. OneVision checkpoints use SigLIP (no CLS)."
        )
    image_processor.save_pretrained(out_dir)
    image_dict = json.loads((out_dir / "preprocessor_config.json").read_text())
    image_dict["processor_class"] = processor_class
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_dict, indent=2, sort_keys=True) + "\n")
    video_dict = {key: image_dict[key] for key in VIDEO_SETTINGS if key in image_dict}
    video_dict.update(video_processor_type="LlavaOnevisionVideoProcessor", processor_class=processor_class)
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video_dict, indent=2, sort_keys=True) + "\n")

    tile = image_dict["size"].get("height") or image_dict["size"]["shortest_edge"]
    processor_dict = {
        "processor_class": processor_class,
        "num_image_tokens": (tile // source_processor.patch_size) ** 2,  # per crop, as the stock processor counts
        "vision_feature_select_strategy": source_processor.vision_feature_select_strategy,
        "image_token": source_processor.image_token,
        "video_token": source_processor.video_token,
        "vision_aspect_ratio": source_processor.vision_aspect_ratio,
    }
    (out_dir / "processor_config.json").write_text(json.dumps(processor_dict, indent=2, sort_keys=True) + "\n")
    source_processor.tokenizer.save_pretrained(out_dir)
    tokenizer_dict = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_dict["processor_class"] = processor_class  # it named our processor
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_dict, indent=2, ensure_ascii=False) + "\n")
    if isinstance(source_processor.chat_template, str):
        (out_dir / "chat_template.jinja").write_text(source_processor.chat_template)


__all__ = ["EXPORT_MODEL_TYPES", "STOCK_FAMILIES", "StockFamily", "export_checkpoint"]
