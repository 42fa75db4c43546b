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

- int4 weight-only on CPU with torchao (`quantize_int4_weight_only`, `int4_weight_only_config(config)`), in bf16: the
  language model's linears read 4-bit weights in groups of 32 input channels (an asymmetric scale and zero point a
  group), through torchao's CPU int4 tensor (`Int4OpaqueTensor`, ATen's `_weight_int4pack_mm_for_cpu`, which
  inductor turns into its C++ int4 weight-only GEMM in the compiled decode); lm_head in int8 by default; the vision
  tower and projector as for int8. It quantizes while loading only: torchao 0.18 cannot write its CPU int4 tensor to
  safetensors, so `save_pretrained` refuses the model (`ValueError: Unsupported tensor type`).

      decode step reads per token (small benchmark):  int8 136 MB   int4 97 MB (of which lm_head, int8, 33 MB)

- 4/8-bit on CUDA with bitsandbytes, through transformers' `BitsAndBytesConfig`, the vision tower and projector kept
  in 16-bit.
"""

import importlib.util
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import BitsAndBytesConfig, logging

logger = logging.get_logger(__name__)

# --- torchao (int8 weight-only) ---

QUANTIZE_CHOICES = ("int8", "int4")  # `quantize=` values of `llava_ext.chat.load_model_and_processor`
# Modules int8 (and int4) weight-only quantization leaves in the model's floating dtype. The vision tower and the
# projector run once per image, in the prefill, so their bytes do not bound the decode speed; the language model's
# linears and lm_head are read for every token and are quantized. Matched as prefixes at a module boundary (as
# transformers' `should_convert_module` does for `TorchAoConfig.modules_to_not_convert`); each part twice, under
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
    """The floating dtype of an int8 (or int4) weight-only model's activations and unquantized parts, for
    `dtype="auto"`.

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


def _linear_names_with_weight(model: torch.nn.Module, weight_class: type) -> list[str]:
    """Names of the `nn.Linear` modules of `model` whose weights are `weight_class` tensors."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, weight_class)
    ]


def int8_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules of `model` whose weights are torchao int8 tensors."""
    if importlib.util.find_spec("torchao") is None:
        return []
    from torchao.quantization import Int8Tensor

    return _linear_names_with_weight(model, Int8Tensor)


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

    already = int8_linear_names(model) + int4_linear_names(model)
    if already:
        raise ValueError(
            f"The model already has {len(already)} quantized linear layers (e.g. {already[0]!r}); quantize a model "
            "once, from its floating-point weights."
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


# --- torchao (int4 weight-only, CPU) ---

# torchao's CPU int4 tensor (`Int4OpaqueTensor.from_hp`, torchao 0.18) packs groups of 32, 64 or 128 input channels;
# its config's docstring also names 256, which the packing refuses.
INT4_GROUP_SIZES = (32, 64, 128)
# 32: the finest torchao offers. Its scale and zero point (bf16, 4 bytes a group) make 5.0 bits a weight, about
# llama.cpp's Q4_K_M (4.5 bits for Q4_K, 6.6 for the Q6_K tensors it keeps); on Gaussian weights its matmul error is
# 0.079 of the output against 0.100 at 128 (4.25 bits a weight). On the small benchmark model 128 read 10% fewer bytes
# a token but decoded only 5% faster, with logits moved a third further. Every LLaVA-1.5 width is a multiple of 32.
INT4_DEFAULT_GROUP_SIZE = 32
# lm_head, the largest single matrix read per token, in int8 by default: its error goes straight into the logits that
# pick each token (llama.cpp's Q4_K_M keeps `output.weight` in Q6_K for the same reason).
INT4_LM_HEAD_CHOICES = ("int8", "int4", "float")
# inductor's C++ int4 weight-only GEMM, which the compiled decode runs (`chat.decode_compile_config` offers no other
# GEMM backend), takes output rows in blocks of 64 and bf16 activations only (torch 2.13: `CppMicroGemmWoQInt4Avx512`
# and its AMX twin); a layer it cannot take fails the whole compiled step. ATen's packing alone would take 16.
INT4_OUT_FEATURES_MULTIPLE = 64


def _int4_config(group_size: int, qparams: str):
    """torchao's CPU int4 weight-only config (prototype in torchao 0.18: the stable `Int4WeightOnlyConfig`'s packing
    formats need CUDA, or mslk). `set_inductor_config=False`, as for int8."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

    return PrototypeInt4WeightOnlyConfig(
        group_size=group_size, int4_choose_qparams_algorithm=Int4ChooseQParamsAlgorithm(qparams),
        set_inductor_config=False,
    )


def _check_int4_arguments(group_size: int, lm_head: str, qparams: str) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not one torchao's CPU int4 packing takes; use one of "
            f"{', '.join(map(str, INT4_GROUP_SIZES))} (smaller: more accurate, more bytes)."
        )
    if lm_head not in INT4_LM_HEAD_CHOICES:
        raise ValueError(
            f"lm_head={lm_head!r} is not supported; use 'int8' (the default), 'int4' or 'float' (kept as loaded)."
        )
    if qparams not in ("tinygemm", "hqq"):
        raise ValueError(
            f"qparams={qparams!r} is not an int4 scale/zero-point algorithm; use 'tinygemm' (min-max, the default) "
            "or 'hqq' (optimized: slightly lower error, 10-50x slower to quantize)."
        )


def int4_weight_only_config(
    config,
    group_size: int = INT4_DEFAULT_GROUP_SIZE,
    lm_head: Literal["int8", "int4", "float"] = "int8",
    qparams: Literal["tinygemm", "hqq"] = "tinygemm",
    skip_modules: Sequence[str] = INT8_SKIP_MODULES,
    trust_remote_code: bool = False,
):
    """transformers' `TorchAoConfig` that quantizes a checkpoint as `quantize_int4_weight_only` does, while it loads.

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, config=config, quantization_config=int4_weight_only_config(config), dtype=torch.bfloat16
        )

    It names each linear to quantize (read from a weightless meta-device skeleton of `config`): the shapes decide
    which ones int4 can take (`int4_unfit_linear_names`), and a catch-all pattern would also hand torchao the norms.
    CPU and bf16 only (see `quantize_int4_weight_only`), and load-time only: torchao 0.18 cannot write its CPU int4
    tensor to safetensors, so `save_pretrained` raises `ValueError: Unsupported tensor type`; keep the floating
    checkpoint and quantize it each time it loads (about 0.1 s per 2048x2048 matrix on 2 cores).

    Args:
        config (`PretrainedConfig`): the checkpoint's config (`AutoConfig.from_pretrained`).
        group_size (`int`, *optional*, defaults to `INT4_DEFAULT_GROUP_SIZE`): input channels sharing a scale and
            zero point, one of `INT4_GROUP_SIZES`.
        lm_head (`str`, *optional*, defaults to `"int8"`): `"int8"` (int8 weight-only, as `quantize="int8"`),
            `"int4"` like the other linears, or `"float"` (kept in the loading dtype).
        qparams (`str`, *optional*, defaults to `"tinygemm"`): how scales and zero points are chosen: `"tinygemm"`
            (each group's min and max) or `"hqq"` (optimized, torchao's HQQ: about 3% lower error on Gaussian
            weights, 10-50x slower to quantize).
        skip_modules (`Sequence[str]`, *optional*, defaults to `INT8_SKIP_MODULES`): module paths kept unquantized.
        trust_remote_code (`bool`, *optional*, defaults to `False`): build the skeleton of a model shipping its code.

    Returns:
        `transformers.TorchAoConfig`.

    Raises:
        `ImportError`: torchao is not installed.
        `ValueError`: a bad argument, or no linear layer outside `skip_modules` has a shape int4 takes.
    """
    from transformers import AutoModelForImageTextToText, TorchAoConfig

    _require_torchao("int4 weight-only quantization")
    _check_int4_arguments(group_size, lm_head, qparams)
    from torchao.quantization import FqnToConfig

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    head = () if lm_head == "int4" else ("lm_head",)
    unfit = int4_unfit_linear_names(skeleton, group_size, lm_head, skip_modules)
    int4 = set(_floating_linears(skeleton, tuple(skip_modules) + head)) - set(unfit)
    if not int4:  # before any weight loads
        raise ValueError(
            f"{type(skeleton).__name__} has no nn.Linear layer outside {list(skip_modules)} whose shape int4 takes "
            f"(in_features a multiple of group_size={group_size}, out_features of {INT4_OUT_FEATURES_MULTIPLE}), so "
            f"int4 weight-only quantization has nothing to quantize; use a smaller group_size "
            f"({', '.join(map(str, INT4_GROUP_SIZES))}) or int8 weight-only."
        )
    # exact parameter names: transformers' torchao integration then quantizes those weights and no other parameter
    configs = {f"{name}.weight": _int4_config(group_size, qparams) for name in sorted(int4)}
    if lm_head == "int8" and "lm_head" in _floating_linears(skeleton, skip_modules):
        configs["lm_head.weight"] = _int8_config()
    skip = list(skip_modules) + list(unfit) + (["lm_head"] if lm_head == "float" else [])
    return TorchAoConfig(FqnToConfig(configs), modules_to_not_convert=skip)


def int4_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules of `model` whose weights are torchao CPU int4 tensors."""
    if importlib.util.find_spec("torchao") is None:
        return []
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    return _linear_names_with_weight(model, Int4OpaqueTensor)


def _floating_linears(model: torch.nn.Module, skip: Sequence[str]) -> dict[str, torch.nn.Linear]:
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight.is_floating_point() and not _is_skipped(name, skip)
    }


def int4_unfit_linear_names(
    model: torch.nn.Module,
    group_size: int = INT4_DEFAULT_GROUP_SIZE,
    lm_head: Literal["int8", "int4", "float"] = "int8",
    skip_modules: Sequence[str] = INT8_SKIP_MODULES,
) -> list[str]:
    """Names of the linears int4 quantization would quantize but leaves in bf16 for their shape: `in_features` not a
    multiple of `group_size` (torchao leaves those itself) or `out_features` not a multiple of
    `INT4_OUT_FEATURES_MULTIPLE` (the compiled decode's int4 GEMM could not run them). Reads shapes only: works on a
    meta-device skeleton before loading, and on a quantized model after.

    Args:
        model (`torch.nn.Module`): the model (any device, meta included).
        group_size (`int`, *optional*, defaults to `INT4_DEFAULT_GROUP_SIZE`): the int4 group size.
        lm_head (`str`, *optional*, defaults to `"int8"`): lm_head's precision; only `"int4"` subjects it to the rule.
        skip_modules (`Sequence[str]`, *optional*, defaults to `INT8_SKIP_MODULES`): module paths left on purpose.
    """
    skip = tuple(skip_modules) + (() if lm_head == "int4" else ("lm_head",))
    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not _is_skipped(name, skip)
        and (module.in_features % group_size or module.out_features % INT4_OUT_FEATURES_MULTIPLE)
    ]


def warn_about_unfit_int4_linears(model: torch.nn.Module, unfit: Sequence[str], group_size: int) -> None:
    """Log a warning naming the linears (`int4_unfit_linear_names`) that int4 quantization left floating."""
    if not unfit:
        return
    first = model.get_submodule(unfit[0])
    names = f"{', '.join(unfit[:3])}{', ...' if len(unfit) > 3 else ''}"
    logger.warning(
        f"int4 weight-only quantization left {len(unfit)} linear layers in {first.weight.dtype}, unquantized: {names} "
        f"(e.g. in_features {first.in_features}, out_features {first.out_features}). int4 needs in_features a "
        f"multiple of group_size={group_size} (one of {', '.join(map(str, INT4_GROUP_SIZES))} may divide it) and "
        f"out_features a multiple of {INT4_OUT_FEATURES_MULTIPLE} (the compiled decode's int4 GEMM)."
    )


def quantize_int4_weight_only(
    model: torch.nn.Module,
    group_size: int = INT4_DEFAULT_GROUP_SIZE,
    lm_head: Literal["int8", "int4", "float"] = "int8",
    qparams: Literal["tinygemm", "hqq"] = "tinygemm",
    skip_modules: Sequence[str] = INT8_SKIP_MODULES,
) -> torch.nn.Module:
    """Quantize the language model's linear weights to int4 in place, on CPU (torchao's CPU int4 weight-only tensor).

    Weights are stored as 4-bit integers, each group of `group_size` input channels with its own scale and zero
    point (asymmetric, bf16); activations stay in bf16 (A16W4). Batch-1 decoding reads every weight once per token,
    so under `torch.compile` (`ChatSession`'s default) it reads under a third of bf16's bytes: inductor runs each
    layer as its C++ int4 weight-only GEMM (AVX512 or AMX). Uncompiled, each call goes to ATen's
    `_weight_int4pack_mm_for_cpu` through torchao's tensor subclass, several times slower than compiled. lm_head is
    int8 by default (`lm_head`); the vision tower and projector (`skip_modules`) stay as they are. A linear whose
    shape int4 cannot take stays in bf16 too, with a logged warning naming it (`int4_unfit_linear_names`: none in
    LLaVA-1.5's language models); `int4_linear_names(model)` lists the int4 ones.

    A model quantized so cannot be saved (torchao 0.18 has no safetensors form for its CPU int4 tensor): keep the
    floating checkpoint and quantize after each load.

    Args:
        model (`torch.nn.Module`): a LLaVA model (or any model with `nn.Linear` layers) on CPU, in bf16: inductor's
            int4 GEMM takes bf16 activations only (it converts them itself, so a CPU without native bf16 runs it
            too, though the rest of the model then computes in emulated bf16).
        group_size (`int`, *optional*, defaults to `INT4_DEFAULT_GROUP_SIZE`): input channels sharing a scale and
            zero point, one of `INT4_GROUP_SIZES`.
        lm_head (`str`, *optional*, defaults to `"int8"`): `"int8"`, `"int4"` or `"float"` (left as it is).
        qparams (`str`, *optional*, defaults to `"tinygemm"`): `"tinygemm"` (min-max per group) or `"hqq"`.
        skip_modules (`Sequence[str]`, *optional*, defaults to `INT8_SKIP_MODULES`): module paths kept unquantized.

    Returns:
        `model`, quantized in place.

    Raises:
        `ImportError`: torchao is not installed.
        `ValueError`: a bad argument; the model is not on CPU, not in bf16 or already quantized; or no linear layer
            outside `skip_modules` has a shape int4 can take.
    """
    _require_torchao("int4 weight-only quantization")
    _check_int4_arguments(group_size, lm_head, qparams)
    from torchao.quantization import quantize_

    already = int8_linear_names(model) + int4_linear_names(model)
    if already:
        raise ValueError(
            f"The model already has {len(already)} quantized linear layers (e.g. {already[0]!r}); quantize a model "
            "once, from its floating-point weights."
        )
    devices = {parameter.device.type for parameter in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(
            f"int4 weight-only quantization packs weights for torchao's CPU kernel, and the model is on "
            f"{', '.join(sorted(devices))}; move it to the CPU first (model.to('cpu')), or on a GPU use "
            "bitsandbytes_config(4)."
        )
    linears = _floating_linears(model, tuple(skip_modules) + (() if lm_head == "int4" else ("lm_head",)))
    dtypes = {module.weight.dtype for module in linears.values()} - {torch.bfloat16}
    if dtypes:
        raise ValueError(
            f"int4 weight-only quantization needs a bf16 model, and its linears are in "
            f"{', '.join(sorted(map(str, dtypes)))}: the compiled decode's int4 GEMM (inductor's) takes bf16 "
            "activations only. Call model.to(torch.bfloat16) first."
        )
    unfit = int4_unfit_linear_names(model, group_size, lm_head, skip_modules)
    selected = set(linears) - set(unfit)
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has no floating-point nn.Linear layer outside {list(skip_modules)} whose shape "
            f"int4 takes (in_features a multiple of group_size={group_size}, out_features of "
            f"{INT4_OUT_FEATURES_MULTIPLE}), so int4 weight-only quantization has nothing to quantize; use a smaller "
            f"group_size ({', '.join(map(str, INT4_GROUP_SIZES))}) or quantize_int8_weight_only."
        )
    quantize_(model, _int4_config(group_size, qparams), filter_fn=lambda module, name: name in selected)
    if lm_head == "int8" and "lm_head" in _floating_linears(model, skip_modules):
        quantize_(model, _int8_config(), filter_fn=lambda module, name: name == "lm_head")
    warn_about_unfit_int4_linears(model, unfit, group_size)
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
    "INT4_DEFAULT_GROUP_SIZE",
    "INT4_GROUP_SIZES",
    "INT4_LM_HEAD_CHOICES",
    "INT4_OUT_FEATURES_MULTIPLE",
    "cpu_has_native_bf16",
    "int8_default_dtype",
    "int8_linear_names",
    "int8_weight_only_config",
    "quantize_int8_weight_only",
    "int4_linear_names",
    "int4_weight_only_config",
    "quantize_int4_weight_only",
    "int4_unfit_linear_names",
    "warn_about_unfit_int4_linears",
    "bitsandbytes_config",
    "check_bitsandbytes_environment",
]
