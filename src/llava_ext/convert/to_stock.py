"""`llava_ext` -> transformers' stock `llava` layout (`export_checkpoint`, the `llava-ext export` command).

The keys already are stock llava's; what changes is everything that names our code: config.json loses `auto_map` and
becomes a `LlavaConfig`, the processor is transformers' `LlavaProcessor`, and no .py file is written, so the result
loads with `LlavaForConditionalGeneration` and `AutoProcessor` without llava_ext installed.
"""

import os
from pathlib import Path
from typing import Literal

from transformers import AutoProcessor, LlavaConfig, LlavaImageProcessorPil, LlavaProcessor

from .hub import USAGE_STOCK, model_card
from .io import TensorSource, atomic_directory, check_output_free, read_llava_checkpoint, write_sharded_safetensors
from .plan import copy_generation_config, dominant_dtype, image_processor_settings, parse_dtype, planned_tensor


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
    dtype = parse_dtype(dtype)
    src_dir, config_dict = read_llava_checkpoint(src, "`export`")
    stock_config = LlavaConfig.from_dict({k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type")})
    stock_config.architectures = ["LlavaForConditionalGeneration"]
    source_processor = AutoProcessor.from_pretrained(src_dir)
    source_processor.tokenizer.init_kwargs.pop("auto_map", None)  # it names LlavaExtProcessor: stock has no code
    stock_keys = LlavaImageProcessorPil().to_dict()
    image_settings = {k: v for k, v in image_processor_settings(source_processor.image_processor.to_dict()).items()
                      if k in stock_keys}
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
    plan = {key: planned_tensor(source, key, dtype) for key in source.keys()}

    with atomic_directory(out, overwrite) as tmp:
        write_sharded_safetensors(plan, tmp, max_shard_size=max_shard_size, progress=progress)
        stock_config.dtype = dominant_dtype(plan)
        stock_config.save_pretrained(tmp)
        copy_generation_config(src_dir, tmp)
        processor.save_pretrained(tmp)
        description = "LLaVA exported from a llava_ext checkpoint to transformers' stock `llava` layout."
        model_card(None, out.name, description, USAGE_STOCK).save(tmp / "README.md")
    return out


__all__ = ["export_checkpoint"]
