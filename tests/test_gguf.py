"""`llava-ext export --format gguf`: the two files llama.cpp loads, read back with gguf's own reader.

Expected values come from the checkpoint's files (safetensors, config.json, processor_config.json, the tokenizer as
transformers / sentencepiece load it) and from llama.cpp's conventions written out here independently of the
exporter: the language model's names from gguf's TensorNameMap (what convert_hf_to_gguf.py applies), the mmproj's
from the name chain of llama.cpp's LLaVA-1.5 converter (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py),
and the q/k row order by running rope both ways (transformers' rotate-half on the checkpoint, llama.cpp's
interleaved pairs on the GGUF) and comparing the attention scores.
"""

import json
import shutil
import string

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, PATCH_SIZE, build_tiny_tokenizer, tiny_llava_config
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, LlavaExtProcessor
from llava_ext.cli import main
from llava_ext.convert import export_gguf
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor

gguf = pytest.importorskip("gguf")

IMAGE_MEAN, IMAGE_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not CLIP's, so a default cannot pass for them
LLAMA3_REGEX = (  # Meta-Llama-3's tokenizer.json pre-tokenizer, as llama.cpp's llama-vocab.cpp quotes it
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
F32, F16, BF16, Q8_0 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                        gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0)
OUTTYPE_QTYPES = {"f32": F32, "bf16": BF16, "q8_0": Q8_0}
FILE_TYPES = {"f32": 0, "bf16": 32, "q8_0": 7}  # llama.h's LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16 / MOSTLY_Q8_0


# -------------------------------------------------------------------------------------------------- tokenizers
def build_llama_tokenizer(pieces: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Llama-2's tokenizer.json at toy size (what a sentencepiece tokenizer becomes in transformers 5): BPE over
    "▁"-marked pieces with <0xNN> byte fallback; then <image> and <pad> added, as llava-1.5-hf adds them. `pieces`:
    a sentencepiece model's, in id order, instead of the built-in ones."""
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "a"), ("i", "n"), ("\u2581", "in")]
    if pieces is None:
        vocab_list = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
        vocab_list += ["\u2581"] + list(string.ascii_letters + string.digits + ".,?!:'")
        vocab_list += ["".join(pair) for pair in merges if "".join(pair) not in vocab_list]
    else:
        vocab_list, merges = pieces, []
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(vocab_list)}, merges=merges,
                                   unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's kind of tokenizer at toy size: byte-level BPE split by Llama 3's regex, specials added after."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte characters
    merges = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he"), ("i", "n")]  # \u0120 ("Ġ") is the space byte
    vocab_list = alphabet + ["".join(pair) for pair in merges]
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(vocab_list)}, merges=merges,
                                   ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<|pad|>"})
    bos_id = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    return tokenizer


def save_checkpoint(directory, tokenizer, text="llama", vocab_size=384, edit_config=None, **config_kwargs):
    """A llava_ext checkpoint with random weights (no zero biases or unit norms to hide a mix-up) and `tokenizer`."""
    torch.manual_seed(0)
    config = tiny_llava_config(text=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                               **config_kwargs)
    if edit_config is not None:
        edit_config(config)
    config.text_config.vocab_size = vocab_size
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id, config.text_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict()))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
    model.save_pretrained(directory)
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                             image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    LlavaExtProcessor(image_processor, tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """CLIP + Llama, Llama-style tokenizer (318 tokens, 384 embedding rows: the rest are padding)."""
    return save_checkpoint(tmp_path_factory.mktemp("gguf") / "llava-tiny", build_llama_tokenizer())


@pytest.fixture(scope="module", params=["f32", "bf16", "q8_0"])
def exported(request, checkpoint, tmp_path_factory):
    outtype = request.param
    out = tmp_path_factory.mktemp(f"gguf-{outtype}") / "out"
    model_path, mmproj_path = export_gguf(checkpoint, out, outtype, progress=False)
    return outtype, gguf.GGUFReader(model_path), gguf.GGUFReader(mmproj_path), model_path, mmproj_path


# ---------------------------------------------------------------------------------------------- expected values
def legacy_mmproj_name(name: str) -> str:
    """convert_image_encoder_to_gguf.py's get_tensor_name, verbatim, for a CLIP `vision_model.*` or projector key."""
    if name.startswith("multi_modal_projector"):
        return name.replace("multi_modal_projector", "mm").replace("linear_1", "0").replace("linear_2", "2")
    return (name.replace("text_model", "t").replace("vision_model", "v").replace("encoder.layers", "blk")
            .replace("embeddings.", "").replace("_proj", "").replace("self_attn.", "attn_")
            .replace("layer_norm", "ln").replace("layernorm", "ln").replace("mlp.fc1", "ffn_down")
            .replace("mlp.fc2", "ffn_up").replace("embedding", "embd").replace("final", "post")
            .replace("layrnorm", "ln"))


def expected_tensors(checkpoint) -> tuple[dict, dict]:
    """{GGUF name: checkpoint tensor} for the language model and the mmproj, by llama.cpp's conventions."""
    config = json.loads((checkpoint / "config.json").read_text())
    weights = load_file(checkpoint / "model.safetensors")
    num_vision_layers = config["vision_config"]["num_hidden_layers"]
    block_count = config["vision_feature_layer"] % (num_vision_layers + 1)  # -2 -> 2 of 3: the last one is unused
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["text_config"]["num_hidden_layers"])
    text, mmproj = {}, {}
    for key, tensor in weights.items():
        if key.startswith("language_model."):
            hf_name = key.removeprefix("language_model.")
            text[name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = tensor
        elif key.startswith("vision_tower."):
            if "post_layernorm" in key or any(f"layers.{i}." in key for i in range(block_count, num_vision_layers)):
                continue
            mmproj[legacy_mmproj_name("vision_model." + key.removeprefix("vision_tower."))] = tensor
        else:
            mmproj[legacy_mmproj_name(key)] = tensor
    return text, mmproj


def stored_type(name: str, tensor: torch.Tensor, outtype: str):
    """The type convert_hf_to_gguf.py stores a tensor as: 2-D weights in the outtype, the rest F32."""
    always_f32 = ("v.position_embd.weight", "v.patch_embd.weight")
    if tensor.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name in always_f32:
        return F32
    return OUTTYPE_QTYPES[outtype]


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM on (seq, heads, head_dim): rotates the pairs (x[2i], x[2i+1])."""
    head_dim = x.shape[-1]
    angles = positions[:, None] * theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)  # (seq, head_dim / 2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (seq, 1, head_dim / 2)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def rope_rotate_half(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """transformers' Llama rope on (seq, heads, head_dim): rotates the pairs (x[i], x[i + head_dim / 2])."""
    head_dim = x.shape[-1]
    angles = positions[:, None] * theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    rotated = torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], dim=-1)
    return x * cos + rotated * sin


def read_tensor(tensor) -> torch.Tensor:
    """A GGUF tensor's values as float32 in the checkpoint's (row-major) shape."""
    data = tensor.data if tensor.tensor_type == F32 else gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32))


def field(reader, key: str):
    return reader.fields[key].contents()


# ------------------------------------------------------------------------------------------------------- tensors
def test_tensor_names_types_and_shapes(exported, checkpoint):
    outtype, model, mmproj, model_path, mmproj_path = exported
    assert model_path.name == f"model-{outtype}.gguf" and mmproj_path.name == f"mmproj-model-{outtype}.gguf"
    for reader, expected in zip((model, mmproj), expected_tensors(checkpoint)):
        assert {tensor.name for tensor in reader.tensors} == set(expected)  # nothing missing, nothing else
        for tensor in reader.tensors:
            source = expected[tensor.name]
            assert tuple(int(n) for n in tensor.shape) == tuple(reversed(source.shape)), tensor.name  # ggml's ne
            assert tensor.tensor_type == stored_type(tensor.name, source, outtype), tensor.name
    assert "output.weight" in {tensor.name for tensor in model.tensors}  # untied: the head is written
    assert {tensor.name for tensor in mmproj.tensors} >= {"v.class_embd", "v.pre_ln.weight", "v.blk.1.ffn_up.bias",
                                                          "mm.0.weight", "mm.2.bias"}
    assert not any(tensor.name.startswith(("v.blk.2.", "v.post_ln")) for tensor in mmproj.tensors)
    # the legacy fc1 -> ffn_down naming is what clip.cpp swaps back for the "mlp" projector: when ffn_down's input
    # width (ne[0]) is the embedding width
    width = field(mmproj, "clip.vision.embedding_length")
    assert all(int(tensor.shape[0]) == width for tensor in mmproj.tensors if tensor.name.endswith("ffn_down.weight"))


def test_q8_0_rows_not_a_multiple_of_32_fall_back_to_f16(tmp_path):
    def vision_intermediate_48(config):
        config.vision_config.intermediate_size = 48

    checkpoint = save_checkpoint(tmp_path / "ckpt", build_llama_tokenizer(), edit_config=vision_intermediate_48)
    mmproj = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "out", "q8_0", progress=False)[1])
    types = {tensor.name: tensor.tensor_type for tensor in mmproj.tensors}
    assert types["v.blk.0.ffn_down.weight"] == Q8_0  # fc1 (48, 32): rows of 32
    assert types["v.blk.0.ffn_up.weight"] == F16  # fc2 (32, 48): gguf's QuantError, llama.cpp's F16 fallback
    fc2 = load_file(checkpoint / "model.safetensors")["vision_tower.encoder.layers.0.mlp.fc2.weight"]
    actual = read_tensor(next(t for t in mmproj.tensors if t.name == "v.blk.0.ffn_up.weight"))
    assert torch.equal(actual, fc2.half().float())


def test_values_equal_the_checkpoint(exported, checkpoint):
    """f32 exactly, bf16 as torch rounds to bf16, q8_0 within one quantization step of its block's scale."""
    outtype, model, mmproj, _, _ = exported
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    text_expected, mmproj_expected = expected_tensors(checkpoint)
    for reader, expected in ((model, text_expected), (mmproj, mmproj_expected)):
        for tensor in reader.tensors:
            actual, source = read_tensor(tensor), expected[tensor.name].float()
            kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
            if kind in heads:  # undo llama.cpp's row order (rope pairs interleaved per head) to compare
                actual = actual.reshape(heads[kind], -1, 2, actual.shape[-1]).transpose(1, 2).reshape(actual.shape)
            if tensor.tensor_type == F32:
                assert torch.equal(actual, source), tensor.name
            elif tensor.tensor_type == BF16:
                assert torch.equal(actual, source.to(torch.bfloat16).float()), tensor.name
            else:
                assert tensor.tensor_type == Q8_0
                blocks, error = source.reshape(-1, 32), (actual - source).reshape(-1, 32).abs()
                scale = blocks.abs().amax(dim=1, keepdim=True) / 127  # Q8_0: int8 values times an f16 scale a block
                assert (error <= scale / 2 + scale * 127 * 2**-11 + 1e-7).all(), tensor.name
                assert error.max() > 0  # really quantized


def test_q_and_k_rows_give_the_same_attention_scores_under_llama_cpp_rope(checkpoint, tmp_path):
    """The permuted q/k under interleaved rope (llama.cpp) score like the checkpoint's under rotate-half rope."""
    model = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "out", "f32", progress=False)[0])
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    n_head, n_kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    theta = config["rope_parameters"]["rope_theta"]
    weights = load_file(checkpoint / "model.safetensors")
    tensors = {tensor.name: read_tensor(tensor).double() for tensor in model.tensors}
    hidden = torch.randn(5, config["hidden_size"], dtype=torch.float64)  # (seq, hidden)
    positions = torch.arange(5).double()

    def scores(q_weight, k_weight, rope):
        q = rope((hidden @ q_weight.T).reshape(5, n_head, head_dim), positions, theta)  # (seq, heads, head_dim)
        k = rope((hidden @ k_weight.T).reshape(5, n_kv, head_dim), positions, theta)
        k = k.repeat_interleave(n_head // n_kv, dim=1)  # GQA: each kv head serves n_head / n_kv query heads
        return torch.einsum("qhd,khd->hqk", q, k)  # (heads, seq, seq)

    for layer in range(config["num_hidden_layers"]):
        prefix = f"language_model.model.layers.{layer}.self_attn"
        expected = scores(weights[f"{prefix}.q_proj.weight"].double(), weights[f"{prefix}.k_proj.weight"].double(),
                          rope_rotate_half)
        actual = scores(tensors[f"blk.{layer}.attn_q.weight"], tensors[f"blk.{layer}.attn_k.weight"],
                        rope_interleaved)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(scores(tensors[f"blk.{layer}.attn_q.weight"], tensors[f"blk.{layer}.attn_k.weight"],
                                         rope_rotate_half), expected)  # the permutation matters


# ------------------------------------------------------------------------------------------------------ metadata
def test_language_model_metadata(exported, checkpoint):
    outtype, model, _, _, _ = exported
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    assert field(model, "general.architecture") == "llama"
    assert field(model, "general.type") == "model"
    assert field(model, "general.file_type") == FILE_TYPES[outtype]
    assert field(model, "llama.block_count") == config["num_hidden_layers"]
    assert field(model, "llama.context_length") == config["max_position_embeddings"]
    assert field(model, "llama.embedding_length") == config["hidden_size"]
    assert field(model, "llama.feed_forward_length") == config["intermediate_size"]
    assert field(model, "llama.attention.head_count") == config["num_attention_heads"]
    assert field(model, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(model, "llama.rope.freq_base") == config["rope_parameters"]["rope_theta"]
    assert field(model, "llama.rope.dimension_count") == config["head_dim"]
    assert field(model, "llama.attention.key_length") == field(model, "llama.attention.value_length") == 8
    assert field(model, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert field(model, "llama.vocab_size") == config["vocab_size"]


def test_llama_style_tokenizer_and_chat_template(exported, checkpoint):
    _, model, _, _, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab_size = json.loads((checkpoint / "config.json").read_text())["text_config"]["vocab_size"]
    assert field(model, "tokenizer.ggml.model") == "llama"  # llama.cpp's SPM tokenizer (scores, byte fallback)
    tokens = field(model, "tokenizer.ggml.tokens")
    assert len(tokens) == vocab_size  # one token per embedding row
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[len(tokenizer) :] == [f"[PAD{i}]" for i in range(len(tokenizer), vocab_size)]
    types = field(model, "tokenizer.ggml.token_type")
    token_type = gguf.TokenType
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == token_type.BYTE
    assert types[tokenizer.convert_tokens_to_ids("<image>")] == token_type.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("\u2581the")] == token_type.NORMAL
    assert set(types[len(tokenizer) :]) == {token_type.UNUSED}
    assert len(field(model, "tokenizer.ggml.scores")) == vocab_size
    assert field(model, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id == 1
    assert field(model, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id == 2
    assert field(model, "tokenizer.ggml.unknown_token_id") == tokenizer.unk_token_id == 0
    assert field(model, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field(model, "tokenizer.ggml.add_bos_token") is True  # the post-processor prepends <s>
    assert field(model, "tokenizer.chat_template") == (checkpoint / "chat_template.jinja").read_text()


def test_mmproj_metadata(exported, checkpoint):
    outtype, _, mmproj, _, _ = exported
    config = json.loads((checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    image_processor = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]
    assert field(mmproj, "general.architecture") == "clip"
    assert field(mmproj, "general.type") == "mmproj"
    assert field(mmproj, "general.file_type") == FILE_TYPES[outtype]
    assert field(mmproj, "clip.projector_type") == "mlp"
    assert field(mmproj, "clip.has_vision_encoder") is True
    assert field(mmproj, "clip.has_llava_projector") is True
    assert field(mmproj, "clip.vision.image_size") == vision["image_size"] == IMAGE_SIZE
    assert field(mmproj, "clip.vision.patch_size") == vision["patch_size"] == PATCH_SIZE
    assert field(mmproj, "clip.vision.embedding_length") == vision["hidden_size"]
    assert field(mmproj, "clip.vision.feed_forward_length") == vision["intermediate_size"]
    assert field(mmproj, "clip.vision.attention.head_count") == vision["num_attention_heads"]
    assert field(mmproj, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(vision["layer_norm_eps"])
    assert field(mmproj, "clip.vision.projection_dim") == config["text_config"]["hidden_size"]
    # hidden state -2 of 3 layers is the output of layer 2: llama.cpp runs 2 blocks and takes that state
    assert field(mmproj, "clip.vision.block_count") == 2
    assert field(mmproj, "clip.vision.feature_layer") == [2]
    assert field(mmproj, "clip.use_gelu") is (vision["hidden_act"] == "gelu")  # False: CLIP's quick_gelu
    np.testing.assert_allclose(field(mmproj, "clip.vision.image_mean"), image_processor["image_mean"], rtol=1e-7)
    np.testing.assert_allclose(field(mmproj, "clip.vision.image_std"), image_processor["image_std"], rtol=1e-7)
    assert image_processor["image_mean"] == IMAGE_MEAN


# ------------------------------------------------------------------------------------------ other tokenizers etc.
def test_mistral_backbone_with_byte_level_bpe(tmp_path):
    tokenizer = build_byte_level_tokenizer()
    checkpoint = save_checkpoint(tmp_path / "ckpt", tokenizer, text="mistral", vocab_size=320)
    model_path, _ = export_gguf(checkpoint, tmp_path / "out", progress=False)
    model = gguf.GGUFReader(model_path)
    assert field(model, "general.architecture") == "llama"  # llama.cpp writes Mistral as llama
    assert field(model, "tokenizer.ggml.model") == "gpt2"
    assert field(model, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = field(model, "tokenizer.ggml.tokens")
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[len(tokenizer) :] == [f"[PAD{i}]" for i in range(len(tokenizer), 320)]
    merges = json.loads((checkpoint / "tokenizer.json").read_text())["model"]["merges"]
    assert field(model, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges] == ["\u0120 t", "h e",
                                                                                             "\u0120t he", "i n"]
    types = field(model, "tokenizer.ggml.token_type")
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<image>", "<|pad|>"):
        assert types[tokenizer.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL
    assert field(model, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(model, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    weights = load_file(checkpoint / "model.safetensors")
    tensors = {tensor.name: read_tensor(tensor) for tensor in model.tensors}
    prefix = "language_model.model.layers"
    assert torch.equal(tensors["blk.1.attn_v.weight"], weights[f"{prefix}.1.self_attn.v_proj.weight"])
    assert torch.equal(tensors["blk.0.ffn_down.weight"], weights[f"{prefix}.0.mlp.down_proj.weight"])


def test_sentencepiece_tokenizer_model(tmp_path):
    """With a tokenizer.model, llama.cpp's converter reads sentencepiece's pieces, scores and types (and the added
    tokens from the tokenizer's saved files)."""
    spm = pytest.importorskip("sentencepiece")
    corpus = ["the cat sat on the mat", "a dog in the fog", "then the hen ate the tea", "in and out"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    pieces = [processor.id_to_piece(index) for index in range(processor.get_piece_size())]
    checkpoint = save_checkpoint(tmp_path / "ckpt", build_llama_tokenizer(pieces))
    shutil.copy(tmp_path / "spm.model", checkpoint / "tokenizer.model")
    model_path, _ = export_gguf(checkpoint, tmp_path / "out", progress=False)
    model = gguf.GGUFReader(model_path)
    tokens, scores = field(model, "tokenizer.ggml.tokens"), field(model, "tokenizer.ggml.scores")
    types = field(model, "tokenizer.ggml.token_type")
    assert field(model, "tokenizer.ggml.model") == "llama"
    assert tokens[:300] == pieces
    normal = [index for index in range(3, 300)]  # past <unk> <s> </s>, which the tokenizer also lists as added
    np.testing.assert_allclose([scores[i] for i in normal], [processor.get_score(i) for i in normal], rtol=1e-7)
    assert any(score < 0 for score in scores[259:300])  # real merge scores, not one placeholder
    assert types[processor.piece_to_id("<0x0A>")] == gguf.TokenType.BYTE
    assert types[processor.piece_to_id("\u2581the")] == gguf.TokenType.NORMAL
    image_id = json.loads((checkpoint / "config.json").read_text())["image_token_index"]
    assert image_id == 300 and tokens[300:302] == ["<image>", "<pad>"]  # from tokenizer.json (transformers 5)
    assert types[300] == types[301] == gguf.TokenType.CONTROL
    assert tokens[302] == "[PAD302]" and types[302] == gguf.TokenType.UNUSED and len(tokens) == 384


# --------------------------------------------------------------------------------------------------------- errors
def test_unsupported_backbone_tower_and_tokenizer_are_named(tmp_path):
    qwen = save_checkpoint(tmp_path / "qwen", build_llama_tokenizer(), text="qwen2")
    with pytest.raises(ValueError, match=r"language model is 'qwen2'; GGUF export supports llama and mistral"):
        export_gguf(qwen, tmp_path / "out", progress=False)
    siglip = save_checkpoint(tmp_path / "siglip", build_llama_tokenizer(), vision_feature_select_strategy="full")
    config = json.loads((siglip / "config.json").read_text())
    config["vision_config"] = {**tiny_llava_config(vision="siglip").vision_config.to_dict()}
    (siglip / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vision tower is 'siglip_vision_model'; GGUF export supports CLIP"):
        export_gguf(siglip, tmp_path / "out", progress=False)
    char_level = save_checkpoint(tmp_path / "char", build_tiny_tokenizer(), vocab_size=128)
    with pytest.raises(ValueError, match=r"BPE tokenizer without byte fallback or a byte-level pre-tokenizer "
                                         r"\(character-level\); GGUF cannot express it"):
        export_gguf(char_level, tmp_path / "out", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["char", "qwen", "siglip"]  # no OUT, no sibling


@pytest.mark.parametrize(("change", "message"), [
    ({"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy='full' keeps the CLS token"),
    ({"vision_feature_layer": [-1, -3]}, r"vision_feature_layer=\[-1, -3\] is not in increasing order"),
    ({"projector_hidden_act": "relu"}, r"projector_hidden_act='relu'.*llama.cpp's 'mlp' projector is Linear"),
])
def test_configs_llama_cpp_cannot_run_are_refused(checkpoint, tmp_path, change, message):
    variant = tmp_path / "variant"
    shutil.copytree(checkpoint, variant)
    config = json.loads((variant / "config.json").read_text())
    (variant / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        export_gguf(variant, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_output(checkpoint, tmp_path, monkeypatch):
    real_write, calls = gguf.GGUFWriter.write_tensor_data, []

    def write_then_fail(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 30:  # inside the second file: the first is complete on disk by then
            raise OSError("No space left on device")
        real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(checkpoint, tmp_path / "out", progress=False)
    assert len(calls) == 30
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary sibling


def test_cli_writes_both_files_and_refuses_an_existing_out(checkpoint, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(checkpoint), str(out), "--format", "gguf", "--outtype", "q8_0"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["mmproj-model-q8_0.gguf", "model-q8_0.gguf"]
    printed = capsys.readouterr().out
    assert f"llama-mtmd-cli -m {out / 'model-q8_0.gguf'} --mmproj {out / 'mmproj-model-q8_0.gguf'}" in printed
    assert gguf.GGUFReader(out / "model-q8_0.gguf").fields["general.file_type"].contents() == FILE_TYPES["q8_0"]

    with pytest.raises(SystemExit, match=r"gguf already exists; choose another output directory or pass --overwrite"):
        main(["export", str(checkpoint), str(out), "--format", "gguf"])
    assert main(["export", str(checkpoint), str(out), "--format", "gguf", "--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["mmproj-model-f32.gguf", "model-f32.gguf"]  # f32: default
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gguf"]


def test_cli_options_of_the_other_format_are_errors(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"--outtype q8_0 applies to --format gguf"):
        main(["export", str(checkpoint), str(tmp_path / "out"), "--outtype", "q8_0"])
    with pytest.raises(SystemExit, match=r"--dtype float16 applies to --format stock; for GGUF use --outtype"):
        main(["export", str(checkpoint), str(tmp_path / "out"), "--format", "gguf", "--dtype", "float16"])
    assert not (tmp_path / "out").exists()
