"""`llava_ext` -> GGUF for llama.cpp (`export_gguf`, the `llava-ext export --format gguf` command).

llama.cpp runs LLaVA from two files, the language model and the "mmproj" (vision tower + projector), loaded together
by `llama-mtmd-cli -m MODEL --mmproj MMPROJ` and `llama-server -m MODEL --mmproj MMPROJ`:

    checkpoint                                   OUT/model-{outtype}.gguf          general.architecture "llama"
      language_model.*  ---- LM table ---->        token_embd, blk.{i}.attn_q (rows permuted for llama.cpp's rope), ...
      tokenizer.json / tokenizer.model ---->       tokenizer.ggml.* (+ merges / scores), tokenizer.chat_template
                                                 OUT/mmproj-model-{outtype}.gguf   general.architecture "clip"
      vision_tower.*    ---- mmproj table -->      v.patch_embd, v.blk.{i}.attn_q, ... (layers up to the feature layer)
      multi_modal_projector.linear_{1,2} --->      mm.0, mm.2                          clip.projector_type "mlp"

Both are written the way llama.cpp's own converters write them, through the `gguf` package llama.cpp publishes:
the language model as `convert_hf_to_gguf.py` (`conversion/llama.py` `LlamaModel`, `conversion/base.py` `TextModel`)
writes a Llama/Mistral checkpoint, the mmproj as `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` writes
LLaVA-1.5's CLIP tower (llama.cpp's LLaVA-1.5 recipe, docs/multimodal/llava.md; `convert_hf_to_gguf.py --mmproj`
takes only Pixtral-style llava checkpoints), with the keys `conversion/base.py` `MmprojModel` adds for every mmproj.
Tensor types follow `ModelBase.prepare_tensors`: 2-D weights in `outtype` (a Q8_0 row not a multiple of 32 falls back
to F16, as there), norms, biases, 1-D tensors, position embeddings and the patch embedding in F32.

Memory: one tensor at a time (the header is planned from the source's shapes, then each tensor is read, converted and
written). Writing is atomic: both files go into a temporary sibling of OUT that becomes OUT only when complete.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..compat import tqdm
from ..configuration_llava_ext import LlavaExtConfig
from ..vision import normalize_layer_indices
from .io import TensorSource, atomic_directory, check_output_free, read_json, read_llava_checkpoint
from .original import rename_key

OutType = Literal["f32", "bf16", "q8_0"]
OUTTYPES = ("f32", "bf16", "q8_0")
MODEL_FILE = "model-{outtype}.gguf"  # llama.cpp's names: ggml-model-f16.gguf, mmproj-model-f16.gguf
MMPROJ_FILE = "mmproj-model-{outtype}.gguf"

# Backbones llama.cpp's converter writes as its "llama" architecture (LlamaModel registers LlamaForCausalLM,
# MistralForCausalLM and LlavaForConditionalGeneration's text half)
TEXT_MODEL_TYPES = ("llama", "mistral")
# The LLaVA-1.5 tower llama.cpp's "mlp" projector graph runs (class token, pre-layernorm, CLS dropped)
VISION_MODEL_TYPES = ("clip_vision_model",)
# clip.use_gelu: llama.cpp runs the tower's FFN with GELU if set, else quick-GELU (CLIP's)
VISION_ACTIVATIONS = {"quick_gelu": False, "gelu": True}
ROPE_TYPES = ("default", "linear")

# Language model: gguf's TensorNameMap for MODEL_ARCH.LLAMA, as convert_hf_to_gguf.py applies it. Biases are
# optional in llama.cpp's llama graph (attention_bias / mlp_bias checkpoints).
TEXT_LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
    "self_attn.rotary_emb.inv_freq": None,  # a buffer old transformers saved; llama.cpp computes rope itself
}
TEXT_TO_GGUF = {
    "language_model.model.embed_tokens.weight": "token_embd.weight",
    "language_model.model.norm.weight": "output_norm.weight",
    "language_model.lm_head.weight": "output.weight",  # absent when tied: llama.cpp then reuses token_embd
    **{f"language_model.model.layers.{{}}.{key}": value and f"blk.{{}}.{value}"
       for key, value in TEXT_LAYER_TO_GGUF.items()},
}
# q/k rows are permuted from transformers' rotate-half layout to the interleaved pairs llama.cpp's rope expects
# (LlamaModel.permute): GGUF tensor kind -> the config field with its head count
ROPE_PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}

# Vision tower and projector: convert_image_encoder_to_gguf.py's names. Its fc1 -> ffn_down / fc2 -> ffn_up is sic:
# every LLaVA-1.5 mmproj carries it, and llama.cpp's clip.cpp swaps the pair back for the "mlp" projector whenever
# ffn_down's input width is the embedding width, which holds for this naming at every size (the TensorNameMap's
# fc1 -> ffn_up would be swapped wrongly by that rule for a tower whose intermediate size equals its width).
CLIP_LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down",
    "mlp.fc2": "ffn_up",
}
MMPROJ_TO_GGUF = {
    "vision_tower.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision_tower.embeddings.class_embedding": "v.class_embd",
    "vision_tower.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vision_tower.embeddings.position_ids": None,  # a buffer
    "vision_tower.pre_layrnorm.weight": "v.pre_ln.weight",
    "vision_tower.pre_layrnorm.bias": "v.pre_ln.bias",
    **{f"vision_tower.encoder.layers.{{}}.{module}.{param}": f"v.blk.{{}}.{name}.{param}"
       for module, name in CLIP_LAYER_TO_GGUF.items() for param in ("weight", "bias")},
    # LLaVA reads a hidden state, never the pooled output; the legacy converter drops it for a llava projector
    "vision_tower.post_layernorm.weight": None,
    "vision_tower.post_layernorm.bias": None,
    "multi_modal_projector.linear_1.weight": "mm.0.weight",
    "multi_modal_projector.linear_1.bias": "mm.0.bias",
    "multi_modal_projector.linear_2.weight": "mm.2.weight",
    "multi_modal_projector.linear_2.bias": "mm.2.bias",
}
# Checkpoint keys on disk are 4.x llava names (what `save_pretrained` writes, the tables' keys); llava-hf repos nest
# CLIP one level down and a state dict saved by other tools may use transformers 5's in-memory names.
KEY_PREFIXES = {
    "vision_tower.": ("vision_tower.vision_model.", "model.vision_tower."),
    "multi_modal_projector.": ("model.multi_modal_projector.",),
    "language_model.model.": ("model.language_model.",),
    "language_model.lm_head.": ("lm_head.",),
}
CHECKPOINT_TO_GGUF = {**TEXT_TO_GGUF, **MMPROJ_TO_GGUF}
CHECKPOINT_TO_GGUF.update({
    alias + key.removeprefix(prefix): value
    for prefix, aliases in KEY_PREFIXES.items() for alias in aliases
    for key, value in list(CHECKPOINT_TO_GGUF.items()) if key.startswith(prefix)
})
MMPROJ_PREFIXES = ("v.", "mm.")  # GGUF names that go to the mmproj; the rest is the language model's
# Kept in F32 whatever the outtype (prepare_tensors' always-F32 list; MmprojModel.tensor_force_quant)
F32_TENSORS = ("v.position_embd.weight", "v.patch_embd.weight")

# Byte-level BPE pre-tokenizers -> llama.cpp's tokenizer.ggml.pre (its pre-tokenizer regexes in llama-vocab.cpp).
# convert_hf_to_gguf.py finds these by hashing the tokens of a probe text (get_vocab_base_pre); the regex itself,
# which is what llama.cpp re-implements, names them without a table of per-model hashes.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel(use_regex)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZERS = {GPT2_REGEX: "gpt-2", LLAMA3_REGEX: "llama-bpe"}

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its name, stored type and source shape, and how to make its float32 data."""

    name: str
    qtype: int  # a gguf.GGMLQuantizationType (gguf is imported only when exporting)
    shape: tuple[int, ...]  # the checkpoint's (row-major) shape; GGUF lists it reversed
    make: Callable[[], np.ndarray]


def export_gguf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    outtype: OutType = "f32",
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write a LLaVA-1.5 checkpoint as the two GGUF files llama.cpp's `llama-mtmd-cli` / `llama-server --mmproj` load.

    Supported: a `llava_ext` (or stock `llava`) checkpoint with a Llama or Mistral language model, a CLIP vision tower
    read at one or more increasing `vision_feature_layer`s with the CLS token dropped (`"default"`), the GELU MLP
    projector with biases, and a sentencepiece (`tokenizer.model`), Llama-style byte-fallback BPE or byte-level BPE
    tokenizer. Anything GGUF or llama.cpp's LLaVA graph cannot express raises a `ValueError` naming it, before any
    file is written.

    Args:
        src (`str` or `os.PathLike`): a checkpoint directory or Hub repo id.
        out (`str` or `os.PathLike`): the output directory; must not exist unless `overwrite=True`.
        outtype (`str`, *optional*, defaults to `"f32"`): the type of 2-D weight matrices: `"f32"`, `"bf16"` or
            `"q8_0"` (llama.cpp's `--outtype`); norms, biases and embeddings of positions and patches stay F32.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out` once the new one is complete.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over tensors.

    Returns:
        `tuple[Path, Path]`: `OUT/model-{outtype}.gguf` (the language model, with the tokenizer and chat template) and
        `OUT/mmproj-model-{outtype}.gguf` (vision tower and projector), e.g.
        `llama-mtmd-cli -m OUT/model-q8_0.gguf --mmproj OUT/mmproj-model-q8_0.gguf --image cat.jpg -p "Describe it."`.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}.")
    gguf = _import_gguf()
    out = Path(out).expanduser().absolute()
    check_output_free(out, overwrite)
    src_dir, config_dict = read_llava_checkpoint(src, "GGUF export")
    config = LlavaExtConfig.from_pretrained(src_dir)
    feature_layers = _check_supported(config)
    name = Path(str(src)).name or src_dir.name
    ftype, weight_qtype = _outtype_types(gguf, outtype)

    source = TensorSource(src_dir)
    text_tensors, mmproj_tensors = _plan_tensors(gguf, source, config, max(feature_layers), weight_qtype)
    model_writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_text_metadata(gguf, model_writer, config, name, ftype)
    _add_vocab(gguf, model_writer, src_dir, config.text_config.vocab_size)
    mmproj_writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    _add_mmproj_metadata(gguf, mmproj_writer, config, feature_layers, _image_settings(src_dir), name, ftype)

    model_name, mmproj_name = MODEL_FILE.format(outtype=outtype), MMPROJ_FILE.format(outtype=outtype)
    bar = tqdm(total=len(text_tensors) + len(mmproj_tensors), desc="Writing GGUF", unit="tensor",
               disable=not progress)
    try:
        with atomic_directory(out, overwrite) as tmp:
            _write_gguf(gguf, model_writer, text_tensors, tmp / model_name, on_tensor=bar.update)
            _write_gguf(gguf, mmproj_writer, mmproj_tensors, tmp / mmproj_name, on_tensor=bar.update)
    finally:
        bar.close()
    return out / model_name, out / mmproj_name


def _import_gguf():
    """The `gguf` package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "GGUF export needs the `gguf` package (llama.cpp's own writer): pip install 'llava-ext[gguf]'."
        ) from None
    return gguf


def _outtype_types(gguf, outtype: OutType) -> tuple[int, int]:
    """(general.file_type, the type of 2-D weights) for an outtype, as convert_hf_to_gguf.py's ftype_map."""
    return {
        "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    }[outtype]


def _check_supported(config: LlavaExtConfig) -> list[int]:
    """Refuse what GGUF / llama.cpp's LLaVA graph cannot express; return the feature layers as indices 0..n."""
    text, vision = config.text_config, config.vision_config
    if text.model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"The language model is {text.model_type!r}; GGUF export supports {' and '.join(TEXT_MODEL_TYPES)} "
            "backbones (llama.cpp's 'llama' architecture). Use `llava-ext export --format stock` for this one."
        )
    if vision.model_type not in VISION_MODEL_TYPES:
        raise ValueError(
            f"The vision tower is {vision.model_type!r}; GGUF export supports CLIP towers "
            f"({', '.join(VISION_MODEL_TYPES)}), the LLaVA-1.5 tower llama.cpp's 'mlp' projector runs. Use "
            "`llava-ext export --format stock` for this one."
        )
    if vision.hidden_act not in VISION_ACTIVATIONS:
        raise ValueError(
            f"The vision tower's hidden_act={vision.hidden_act!r} has no llama.cpp equivalent; GGUF export supports "
            f"{', '.join(VISION_ACTIVATIONS)}."
        )
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise ValueError(
            f"The projector (projector_hidden_act={config.projector_hidden_act!r}, multimodal_projector_bias="
            f"{config.multimodal_projector_bias}) is not LLaVA-1.5's; llama.cpp's 'mlp' projector is Linear (with "
            "bias), GELU, Linear (with bias)."
        )
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS token, which "
            "llama.cpp's LLaVA graph always drops for a CLIP tower; GGUF export supports 'default'."
        )
    layers = normalize_layer_indices(config.vision_feature_layer, vision.num_hidden_layers)
    if any(later <= earlier for earlier, later in zip(layers, layers[1:])):
        raise ValueError(
            f"vision_feature_layer={config.vision_feature_layer} is not in increasing order; llama.cpp stacks the "
            "feature layers from the shallowest, so GGUF export supports one layer or a list of increasing ones."
        )
    rope_type = _rope_parameters(text).get("rope_type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"The language model's rope_type={rope_type!r} is not supported by GGUF export yet; supported: "
            f"{', '.join(ROPE_TYPES)}."
        )
    return layers


def _rope_parameters(text_config) -> dict:
    """rope_theta, rope_type (and factor) of a text config: transformers 5's `rope_parameters`, or older names."""
    rope = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    rope.setdefault("rope_type", rope.get("type"))
    rope.setdefault("rope_theta", getattr(text_config, "rope_theta", None))
    return rope


def _permute_for_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' q/k rows (per head: first halves, then second halves) -> llama.cpp's interleaved pairs."""
    head_half = weight.shape[0] // num_heads // 2
    split = weight.reshape(num_heads, 2, head_half, *weight.shape[1:])  # (heads, 2, head_dim / 2, [hidden])
    return split.swapaxes(1, 2).reshape(weight.shape)  # (heads * head_dim, [hidden]), rows (x0, y0, x1, y1, ...)


def _tensor_type(gguf, name: str, shape: tuple[int, ...], weight_qtype: int) -> int:
    """The stored type of one tensor, by ModelBase.prepare_tensors' rules."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name in F32_TENSORS:
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[weight_qtype]
    if shape[-1] % block_size:  # gguf.QuantError there: "falling back to F16"
        return gguf.GGMLQuantizationType.F16
    return weight_qtype


def _plan_tensors(
    gguf, source: TensorSource, config: LlavaExtConfig, block_count: int, weight_qtype
) -> tuple[list[GGUFTensor], list[GGUFTensor]]:
    """Each checkpoint tensor as a GGUF tensor of the language model or the mmproj; unknown keys are errors."""
    text = config.text_config
    heads = {"num_attention_heads": text.num_attention_heads,
             "num_key_value_heads": text.num_key_value_heads or text.num_attention_heads}
    text_tensors, mmproj_tensors = [], []
    for key in source.keys():
        name = rename_key(key, CHECKPOINT_TO_GGUF, tool="GGUF export")
        if name is None:
            continue
        is_text = not name.startswith(MMPROJ_PREFIXES)
        if name.startswith("v.blk.") and int(_LAYER_INDEX.search(name).group(1)) >= block_count:
            continue  # past the deepest feature layer: llama.cpp never runs it (the legacy converter drops it)
        shape = tuple(source.meta(key).shape)
        permute_heads = next((heads[count] for part, count in ROPE_PERMUTED.items()
                              if is_text and f".{part}." in name), None)  # CLIP has no rope: its rows stay
        tensor = GGUFTensor(name, _tensor_type(gguf, name, shape, weight_qtype), shape,
                            _make_tensor(source, key, permute_heads))
        (text_tensors if is_text else mmproj_tensors).append(tensor)
    _check_complete(text_tensors, mmproj_tensors, config, block_count)
    return text_tensors, mmproj_tensors


def _make_tensor(source: TensorSource, key: str, permute_heads: int | None) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        tensor = source.get(key).float()  # llama.cpp converts every tensor through float32 (or float16)
        if permute_heads is not None:
            tensor = _permute_for_rope(tensor, permute_heads)
        return tensor.contiguous().numpy()

    return make


def _check_complete(text_tensors: list[GGUFTensor], mmproj_tensors: list[GGUFTensor], config, block_count: int):
    """Name the weights llama.cpp requires that the checkpoint lacks (a truncated or partial save)."""
    required = {"token_embd.weight", "output_norm.weight"}
    if not config.text_config.tie_word_embeddings and not config.tie_word_embeddings:
        required.add("output.weight")
    required |= {f"blk.{index}.{name}" for index in range(config.text_config.num_hidden_layers)
                 for name in TEXT_LAYER_TO_GGUF.values() if name and name.endswith(".weight")}
    required |= {name for name in MMPROJ_TO_GGUF.values() if name and "{}" not in name}
    required |= {name.format(index) for index in range(block_count)
                 for name in MMPROJ_TO_GGUF.values() if name and "{}" in name}
    missing = sorted(required - {tensor.name for tensor in text_tensors + mmproj_tensors})
    if missing:
        raise ValueError(
            f"The checkpoint lacks the weights for GGUF tensors {missing}; it may be incomplete: download or save it "
            "again."
        )


def _add_text_metadata(gguf, writer, config: LlavaExtConfig, name: str, ftype: int) -> None:
    """The language model's keys, as TextModel.set_gguf_parameters and LlamaModel.set_gguf_parameters write them."""
    text = config.text_config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads or text.num_attention_heads)
    rope = _rope_parameters(text)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_theta"] is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    head_dim = getattr(text, "head_dim", None)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    writer.add_vocab_size(text.vocab_size)
    writer.add_rope_dimension_count(head_dim or text.hidden_size // text.num_attention_heads)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_mmproj_metadata(
    gguf, writer, config: LlavaExtConfig, feature_layers: list[int], image: dict, name: str, ftype: int
) -> None:
    """The mmproj's keys: MmprojModel.set_gguf_parameters' and what convert_image_encoder_to_gguf.py adds for LLaVA."""
    vision = config.vision_config
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA")
    writer.add_file_type(ftype)
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_clip_projector_type(gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
    writer.add_vision_projection_dim(config.text_config.hidden_size)  # the width of what the projector outputs
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    # blocks up to the deepest feature layer: llama.cpp stops there (and reads clip.vision.feature_layer, indices into
    # the hidden states, 0 the embedding output, made non-negative as the legacy converter makes them)
    writer.add_vision_block_count(max(feature_layers))
    writer.add_array("clip.vision.feature_layer", feature_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_image_mean(image["image_mean"])
    writer.add_vision_image_std(image["image_std"])
    writer.add_vision_use_gelu(VISION_ACTIVATIONS[vision.hidden_act])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _image_settings(src_dir: Path) -> dict:
    """The image processor's settings, merged as MmprojModel reads them (preprocessor_config.json, then
    processor_config.json's image_processor)."""
    settings = {}
    if (src_dir / "preprocessor_config.json").is_file():
        settings.update(read_json(src_dir / "preprocessor_config.json"))
    if (src_dir / "processor_config.json").is_file():
        settings.update(read_json(src_dir / "processor_config.json").get("image_processor") or {})
    missing = [key for key in ("image_mean", "image_std") if not isinstance(settings.get(key), list)]
    if missing:
        raise ValueError(
            f"{src_dir} has no image processor {' or '.join(missing)} (preprocessor_config.json or "
            "processor_config.json); save the checkpoint's processor there (`processor.save_pretrained`)."
        )
    return settings


# ------------------------------------------------------------------------------------------------------- tokenizer
def _add_vocab(gguf, writer, src_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.*, in the order LlamaModel.set_vocab tries them: sentencepiece's tokenizer.model, a Llama-style
    tokenizer.json (BPE with byte fallback), then byte-level BPE ("gpt2"); special ids and the chat template from
    gguf's SpecialVocab."""
    config_path = src_dir / "tokenizer_config.json"
    tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(add_prefix_space)
    if (src_dir / "tokenizer.model").is_file():
        spm_vocab = _sentencepiece_vocab(gguf, src_dir, vocab_size, tokenizer_config)
    else:
        try:
            hf_vocab = gguf.LlamaHfVocab(src_dir)
        except (FileNotFoundError, TypeError):  # not Llama-style (or Llama 3's): byte-level BPE, as llama.cpp falls back
            hf_vocab = None
        spm_vocab = None if hf_vocab is None else _llama_hf_vocab(gguf, hf_vocab, vocab_size, src_dir)
    if spm_vocab is not None:  # llama.cpp's SPM tokenizer: pieces with scores, "▁" for spaces, <0xNN> bytes
        tokens, scores, types = spm_vocab
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(src_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return
    pre = _bpe_pre_tokenizer(src_dir)
    tokens, types = _byte_level_vocab(gguf, src_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src_dir, load_merges=True).add_to_gguf(writer, quiet=True)


def _tokenizer_json(src_dir: Path) -> dict:
    if not (src_dir / "tokenizer.json").is_file():
        raise ValueError(
            f"{src_dir} has neither tokenizer.model nor tokenizer.json; GGUF export reads a sentencepiece or BPE "
            "tokenizer from one of them (save the processor with `processor.save_pretrained`)."
        )
    return read_json(src_dir / "tokenizer.json")


def _bpe_pre_tokenizer(src_dir: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer; a ValueError for any other tokenizer."""
    tokenizer = _tokenizer_json(src_dir)
    model_type = (tokenizer.get("model") or {}).get("type")
    steps = _pre_tokenizer_steps(tokenizer.get("pre_tokenizer"))
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if model_type != "BPE" or not byte_level:
        kind = f"a {model_type or 'unknown'} tokenizer" if model_type != "BPE" else (
            "a BPE tokenizer without byte fallback or a byte-level pre-tokenizer (character-level)")
        raise ValueError(
            f"The tokenizer in {src_dir} is {kind}; GGUF cannot express it faithfully (llama.cpp would mis-tokenize "
            "spaces and bytes). GGUF export supports sentencepiece (tokenizer.model), Llama-style BPE with byte "
            "fallback, and byte-level BPE (GPT-2, Llama 3) tokenizers."
        )
    regexes = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    regexes += [GPT2_REGEX for step in byte_level if step.get("use_regex", True)]
    if len(regexes) == 1 and regexes[0] in BPE_PRE_TOKENIZERS:
        return BPE_PRE_TOKENIZERS[regexes[0]]
    raise ValueError(
        f"The byte-level BPE tokenizer in {src_dir} splits text with {regexes or 'no regex'}, which llama.cpp "
        f"implements under no name GGUF export knows; supported: the GPT-2 and Llama 3 pre-tokenizers "
        f"({', '.join(BPE_PRE_TOKENIZERS.values())})."
    )


def _pre_tokenizer_steps(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for inner in pre_tokenizer.get("pretokenizers") or [] for step in _pre_tokenizer_steps(inner)]
    return [pre_tokenizer]


def _byte_level_vocab(gguf, src_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types by id, as TextModel.get_vocab_base makes them (unused ids become "[PAD{id}]")."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    vocab = tokenizer.get_vocab()
    _check_vocab_fits(max(vocab.values()) + 1, vocab_size, src_dir)
    reverse_vocab = {index: token for token, index in vocab.items()}
    added_vocab, added_decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse_vocab:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse_vocab[index]
        if token in added_vocab:
            # llama.cpp expects added tokens pre-normalized
            if not added_decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[index].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special: added tokens some models forgot to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece_vocab(
    gguf, src_dir: Path, vocab_size: int, tokenizer_config: dict
) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types by id from tokenizer.model, as TextModel._create_vocab_sentencepiece makes them (the
    added tokens from tokenizer_config.json's added_tokens_decoder or, as transformers 5 saves them, tokenizer.json)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ImportError(
            f"{src_dir} has a sentencepiece tokenizer.model, which GGUF export reads with the `sentencepiece` package: "
            "pip install 'llava-ext[gguf]'."
        ) from None
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(src_dir / "tokenizer.model"))
    _check_vocab_fits(processor.vocab_size(), vocab_size, src_dir)
    token_type = gguf.TokenType
    tokens = [f"[PAD{index}]".encode() for index in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [token_type.UNUSED] * vocab_size
    for index in range(processor.vocab_size()):
        tokens[index], scores[index] = processor.IdToPiece(index).encode(), processor.GetScore(index)
        types[index] = (token_type.UNKNOWN if processor.IsUnknown(index) else token_type.CONTROL
                        if processor.IsControl(index) else token_type.UNUSED if processor.IsUnused(index)
                        else token_type.BYTE if processor.IsByte(index) else token_type.NORMAL)
    if (src_dir / "added_tokens.json").is_file():
        for token, index in read_json(src_dir / "added_tokens.json").items():
            if index < vocab_size:
                tokens[index], scores[index], types[index] = token.encode(), -1000.0, token_type.USER_DEFINED
    added_tokens = tokenizer_config.get("added_tokens_decoder")
    if added_tokens is None and (src_dir / "tokenizer.json").is_file():  # transformers 5 keeps them only there
        added_tokens = {entry["id"]: entry for entry in read_json(src_dir / "tokenizer.json").get("added_tokens") or []}
    for index, data in (added_tokens or {}).items():
        index, token = int(index), data["content"]
        if index >= vocab_size:
            continue
        if data.get("special") or _looks_special(token):
            types[index] = token_type.CONTROL
        else:
            token = token.replace("\u2581", " ")
            types[index] = token_type.USER_DEFINED
        tokens[index], scores[index] = token.encode(), -1000.0
    return tokens, scores, types


def _llama_hf_vocab(gguf, vocab, vocab_size: int, src_dir: Path) -> tuple[list[bytes], list[float], list[int]]:
    """gguf.LlamaHfVocab's tokens (what TextModel._set_vocab_llama_hf writes), padded with unused "[PAD{id}]" tokens
    to the embedding's rows (as the sentencepiece path pads; llama.cpp needs one token per row)."""
    entries = list(vocab.all_tokens())  # (token, score, type): base tokens by id, then added tokens by id
    misplaced = {token: index for token, index in vocab.added_tokens_dict.items()
                 if index >= len(entries) or entries[index][0] != token.encode()}
    if misplaced:
        raise ValueError(
            f"The tokenizer in {src_dir} has added tokens {misplaced} past a gap in its ids; GGUF lists tokens by id "
            "without gaps. Add tokens right after the vocabulary (`tokenizer.add_tokens`) and save again."
        )
    _check_vocab_fits(len(entries), vocab_size, src_dir)
    padding = range(len(entries), vocab_size)
    tokens = [token for token, _, _ in entries] + [f"[PAD{index}]".encode() for index in padding]
    scores = [score for _, score, _ in entries] + [-10000.0] * len(padding)
    types = [int(kind) for _, _, kind in entries] + [gguf.TokenType.UNUSED] * len(padding)
    return tokens, scores, types


def _check_vocab_fits(num_tokens: int, vocab_size: int, src_dir: Path) -> None:
    if num_tokens > vocab_size:
        raise ValueError(
            f"The tokenizer in {src_dir} has {num_tokens} tokens but the language model's embedding only "
            f"{vocab_size} rows; resize the embeddings to the tokenizer (`model.resize_token_embeddings`) and save "
            "again."
        )


# ------------------------------------------------------------------------------------------------------------ write
def _write_gguf(gguf, writer, tensors: list[GGUFTensor], path: Path, on_tensor: Callable[[], None]) -> None:
    """Header and metadata from the plan, then each tensor made, converted and written in turn."""
    for tensor in tensors:
        if tensor.qtype == gguf.GGMLQuantizationType.F32:
            shape, dtype, nbytes = tensor.shape, np.dtype(np.float32), 4 * int(np.prod(tensor.shape))
        elif tensor.qtype == gguf.GGMLQuantizationType.F16:
            shape, dtype, nbytes = tensor.shape, np.dtype(np.float16), 2 * int(np.prod(tensor.shape))
        else:  # stored as bytes: (..., row bytes)
            shape, dtype = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype), np.dtype(np.uint8)
            nbytes = int(np.prod(shape))
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=tensor.qtype)
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            data = gguf.quants.quantize(tensor.make(), tensor.qtype)
            writer.write_tensor_data(data)
            del data
            on_tensor()
    finally:
        writer.close()


__all__ = [
    "BPE_PRE_TOKENIZERS",
    "CHECKPOINT_TO_GGUF",
    "MMPROJ_FILE",
    "MMPROJ_TO_GGUF",
    "MODEL_FILE",
    "OUTTYPES",
    "TEXT_TO_GGUF",
    "export_gguf",
]
