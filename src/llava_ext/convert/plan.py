"""Tensor plans shared by `convert` and `export`: each output tensor as a lazy cast (and, for embeddings, a resize) of
one source tensor, and the settings carried over from a source's small files.

    TensorSource[key] --planned_tensor(dtype, rows)--> PlannedTensor(meta, make) --io.write_sharded_safetensors--> OUT
"""

from pathlib import Path

import torch
from transformers import GenerationConfig

from .io import PlannedTensor, TensorSource

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# keys of a saved image processor that name classes rather than settings
IMAGE_PROCESSOR_CLASS_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class", "auto_map")


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """A key of `DTYPES` as a torch dtype; `None` (keep each tensor's stored dtype) stays `None`."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def planned_tensor(source: TensorSource, key: str, dtype: torch.dtype | None, rows: int | None = None) -> PlannedTensor:
    """Plan `source[key]` cast to `dtype` (floating tensors only) and, for embeddings, grown to `rows` rows."""
    meta = source.meta(key)
    out_dtype = dtype if dtype is not None and meta.is_floating_point() else meta.dtype
    shape = (rows, *meta.shape[1:]) if rows is not None else tuple(meta.shape)

    def make() -> torch.Tensor:
        tensor = source.get(key)
        if rows is not None and rows > tensor.shape[0]:
            tensor = grow_rows(tensor, rows)
        return tensor.to(out_dtype)

    return PlannedTensor(torch.empty(shape, dtype=out_dtype, device="meta"), make)


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean row (new tokens start at the average embedding): (rows, hidden)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, hidden)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])  # (rows, hidden)


def dominant_dtype(plan: dict[str, PlannedTensor]) -> str:
    """The dtype holding most floating-point parameters, as config.json's `dtype` string."""
    counts = {}
    for planned in plan.values():
        if planned.meta.is_floating_point():
            counts[planned.meta.dtype] = counts.get(planned.meta.dtype, 0) + planned.meta.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def image_processor_settings(image_processor_dict: dict) -> dict:
    """A saved image processor's settings, without the keys that name its classes."""
    return {k: v for k, v in image_processor_dict.items() if k not in IMAGE_PROCESSOR_CLASS_KEYS}


def copy_generation_config(src_dir: Path, out_dir: Path) -> None:
    """Carry the source's generation_config.json over, when it has one."""
    if (src_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src_dir).save_pretrained(out_dir)


__all__ = [
    "DTYPES",
    "copy_generation_config",
    "dominant_dtype",
    "grow_rows",
    "image_processor_settings",
    "parse_dtype",
    "planned_tensor",
]
