"""Lower-precision inference and training for llava_ext models, through the libraries made for it.

- int8 weight-only on CPU (and GPU) with torchao: the language model's linears and lm_head read int8 weights (one
  scale per output channel); the vision tower and projector stay in the model's floating dtype (bf16 where the CPU
  computes it natively). `quantize_int8_weight_only(model)` quantizes a loaded model in place;
  `int8_weight_only_config()` is the same as transformers' `TorchAoConfig`, for `from_pretrained`, and the only way to
  a model that `save_pretrained` can write (torchao's safetensors support; it loads back quantized). Decoding gains
  only compiled (`ChatSession`'s default), where inductor turns each dequantize-and-matmul into one int8 weight-only
  GEMM; uncompiled, every call dequantizes its weight first.

      decode step reads per token (small benchmark, 256M parameters):  fp32 542 MB   bf16 271 MB   int8 136 MB
      (language model linears + lm_head; lm_head alone is 24% of it, so it is quantized too)

- 4/8-bit on CUDA with bitsandbytes, through transformers' `BitsAndBytesConfig`, the vision tower and projector kept
  in 16-bit.
"""

import importlib.util
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import BitsAndBytesConfig

# --- torchao (int8 weight-only) ---

QUANTIZE_CHOICES = ("int8",)  # `quantize=` values of `llava_ext.chat.load_model_and_processor`
# Modules int8 weight-only quantization leaves in the model's floating dtype. The vision tower and the projector run
# once per image, in the prefill, so their bytes do not bound the decode speed; the language model's linears and
# lm_head are read for every token and are quantized. Matched as prefixes at a module boundary (as transformers'
# `should_convert_module` does for `TorchAoConfig.modules_to_not_convert`); each part twice, under
# LlavaExtForConditionalGeneration (`model.`) and under the bare LlavaExtModel.
INT8_SKIP_MODULES = ("model.vision_tower", "model.multi_modal_projector", "vision_tower", "multi_modal_projector")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16, which AMX CPUs also have).

    A bf16 matmul *works* on every CPU, emulated where the instructions are missing and then slower than fp32, so
    "does it run" is no test. torch's check is private (present in 2.x); without it, or on ARM, the answer is no.
    """
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def int8_default_dtype(device: str | torch.device) -> torch.dtype:
    """The floating dtype of an int8 weight-only model's activations and unquantized parts, for `dtype="auto"`.

    bf16 where the device computes it natively (a CPU with AVX512-BF16 / AMX, a CUDA GPU with bf16), else fp32 on a
    CPU (emulated bf16 is slower than fp32) and fp16 on an older GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def stored_bytes(tensor: torch.Tensor, skip_inner: Sequence[str] = ()) -> int:
    """Bytes `tensor` holds: for a wrapper subclass (torchao's int8 weights), those of its inner tensors (int8 data,
    scales, zero points), not `numel * itemsize` of the dtype it presents. `skip_inner` leaves out inner tensors by
    name (the benchmark's bytes-read count skips torchao's all-zero `zero_point`, which the matmul never reads)."""
    if hasattr(tensor, "__tensor_flatten__"):  # a traceable wrapper subclass
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names if name not in skip_inner]
        return sum(stored_bytes(value, skip_inner) for value in inner if value is not None)
    return tensor.nbytes


def _require_torchao(what: str = "int8 weight-only quantization") -> None:
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(
            f"{what} needs torchao, which is not installed: pip install 'llava-ext[quant]' (or pip install torchao)."
        )


def _int8_config():
    """torchao's per-channel symmetric int8 weight-only config. `set_inductor_config=False`: torchao would otherwise
    change process-wide inductor settings (tuned for triton) the first time it quantizes a module."""
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


def _is_skipped(name: str, skip_modules: Sequence[str]) -> bool:
    return any(name == skip or name.startswith(skip + ".") for skip in skip_modules)


def int8_weight_only_config(include_lm_head: bool = True, skip_modules: Sequence[str] = INT8_SKIP_MODULES):
    """transformers' `TorchAoConfig` that quantizes a checkpoint as `quantize_int8_weight_only` does, while it loads.

    A model loaded with it saves (`save_pretrained`, safetensors) and loads back quantized, on transformers 5.17 to
    5.24 with torchao 0.18:

        model = AutoModelForImageTextToText.from_pretrained(
            path, quantization_config=int8_weight_only_config(), dtype=torch.bfloat16
        )
        model.save_pretrained("model-int8")  # later: from_pretrained("model-int8"), no quantization_config needed

    Args:
        include_lm_head (`bool`, *optional*, defaults to `True`): quantize lm_head too (the largest single matrix read
            per token); `False` keeps it in the loading dtype.
        skip_modules (`Sequence[str]`, *optional*, defaults to `INT8_SKIP_MODULES`): module paths kept unquantized.

    Returns:
        `transformers.TorchAoConfig`.
    """
    from transformers import TorchAoConfig

    _require_torchao()
    # A given list replaces transformers' default skips (lm_head and tied weights), hence lm_head here.
    skip = list(skip_modules) + ([] if include_lm_head else ["lm_head"])
    return TorchAoConfig(_int8_config(), modules_to_not_convert=skip)


def int8_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules of `model` whose weights are torchao int8 tensors."""
    if importlib.util.find_spec("torchao") is None:
        return []
    from torchao.quantization import Int8Tensor

    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, Int8Tensor)
    ]


def quantize_int8_weight_only(
    model: torch.nn.Module, include_lm_head: bool = True, skip_modules: Sequence[str] = INT8_SKIP_MODULES
) -> torch.nn.Module:
    """Quantize the language model's linear weights to int8 in place (torchao `Int8WeightOnlyConfig`, per channel).

    Weights are stored as int8 with one scale per output channel; activations stay in the model's floating dtype, so
    a matmul reads a quarter of the fp32 bytes (half of bf16's). Batch-1 decoding reads every weight once per token,
    so it speeds up in proportion under `torch.compile` (inductor turns the dequantize-and-matmul into one int8
    kernel: on CPU, under `chat.decode_compile_config`, its C++ int8 weight-only GEMM); uncompiled, each call
    dequantizes its weight first and is *slower* than the floating model. The vision tower and projector
    (`skip_modules`) stay as they are.

    To save the result, load with `int8_weight_only_config()` instead: transformers saves a model only through the
    quantizer it was loaded with.

    Args:
        model (`torch.nn.Module`): a LLaVA model (or any model with `nn.Linear` layers), in its final floating dtype.
        include_lm_head (`bool`, *optional*, defaults to `True`): quantize lm_head too.
        skip_modules (`Sequence[str]`, *optional*, defaults to `INT8_SKIP_MODULES`): module paths kept unquantized.

    Returns:
        `model`, quantized in place.

    Raises:
        `ImportError`: torchao is not installed.
        `ValueError`: the model is already quantized, or has no linear layer outside `skip_modules`.
    """
    _require_torchao()
    from torchao.quantization import quantize_

    already = int8_linear_names(model)
    if already:
        raise ValueError(
            f"The model already has {len(already)} int8 linear layers (e.g. {already[0]!r}); quantize a model once, "
            "from its floating-point weights."
        )
    skip = tuple(skip_modules) + (() if include_lm_head else ("lm_head",))
    selected = {
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight.is_floating_point() and not _is_skipped(name, skip)
    }
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has no floating-point nn.Linear layer outside {list(skip)}, so int8 weight-only "
            "quantization has nothing to quantize; leave quantize unset (or pass other skip_modules)."
        )
    quantize_(model, _int8_config(), filter_fn=lambda module, name: name in selected)
    return model


# --- bitsandbytes (CUDA 4/8-bit) ---

# Modules bitsandbytes leaves in 16-bit: the vision tower and the projector (small, and what the image features go
# through; LLaVA's own QLoRA kept its projector out with llm_int8_skip_modules=["mm_projector"]) and lm_head.
# transformers (5.17-5.24, `quantizers_utils.should_convert_module`) matches each entry as a regex from the start of a
# module's path, or as its suffix; a given list *replaces* the default skips (lm_head and tied weights,
# `get_keys_to_not_convert`), hence lm_head here. Each part twice: under LlavaExtForConditionalGeneration (`model.`)
# and under the bare LlavaExtModel (AutoModel).
BNB_SKIP_MODULES = (
    "model.vision_tower", "model.multi_modal_projector", "vision_tower", "multi_modal_projector", "lm_head",
)


def bitsandbytes_config(
    bits: Literal[4, 8],
    compute_dtype: torch.dtype = torch.bfloat16,
    *,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = True,
    skip_modules: Sequence[str] = BNB_SKIP_MODULES,
) -> BitsAndBytesConfig:
    """A `BitsAndBytesConfig` quantizing the language model's linears to 4 or 8 bits, the vision tower, projector and
    lm_head left in the loading dtype.

    Pass it with a 16-bit `dtype` (the parts left out keep it; without one they load in fp32):

        model = AutoModelForImageTextToText.from_pretrained(
            path, quantization_config=bitsandbytes_config(4), dtype=torch.bfloat16, device_map="auto"
        )

    Args:
        bits (`int`): 4 (QLoRA's NF4) or 8 (LLM.int8()).
        compute_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): what 4-bit matmuls compute in; use
            `torch.float16` on GPUs without bf16 (before Ampere).
        quant_type (`str`, *optional*, defaults to `"nf4"`): the 4-bit data type, `"nf4"` or `"fp4"`.
        double_quant (`bool`, *optional*, defaults to `True`): quantize the 4-bit scales too (about 0.4 bit a
            weight less).
        skip_modules (`Sequence[str]`, *optional*, defaults to `BNB_SKIP_MODULES`): module paths kept unquantized.

    Returns:
        `transformers.BitsAndBytesConfig`.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not a bitsandbytes width; use 4 (NF4, QLoRA) or 8 (LLM.int8()).")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is not a 4-bit type; use 'nf4' (QLoRA's) or 'fp4'.")
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        llm_int8_skip_modules=list(skip_modules),
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
    )


def check_bitsandbytes_environment(bits: int) -> None:
    """Raise, before anything loads, where `bits`-bit bitsandbytes loading cannot work here: no CUDA GPU, or no
    bitsandbytes.

    Raises:
        `ValueError`: `bits` is not 4 or 8, or torch sees no CUDA GPU.
        `ImportError`: bitsandbytes is not installed.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not a bitsandbytes width; use 4 (NF4, QLoRA) or 8 (LLM.int8()).")
    if not torch.cuda.is_available():
        raise ValueError(
            f"bits={bits} loads the language model with bitsandbytes, which needs a CUDA GPU, and torch "
            f"{torch.__version__} sees none; use bits: 16 (--bits 16) here, or run on a machine with a CUDA GPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"bits={bits} needs bitsandbytes, which is not installed: pip install 'llava-ext[quant]' "
            "(or pip install bitsandbytes), or use bits: 16."
        )


__all__ = [
    "stored_bytes",
    "BNB_SKIP_MODULES",
    "INT8_SKIP_MODULES",
    "QUANTIZE_CHOICES",
    "cpu_has_native_bf16",
    "int8_default_dtype",
    "int8_linear_names",
    "int8_weight_only_config",
    "quantize_int8_weight_only",
    "bitsandbytes_config",
    "check_bitsandbytes_environment",
]
