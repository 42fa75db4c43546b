"""`llava-ext convert` / `export` / push: original LLaVA parity, llava-hf round trip, atomic writing, Hub upload.

The original-format parity test re-implements LLaVA-1.5's forward pass from its published code (expand2square with
the mean colour, CLIP hidden state -2 without CLS, mlp2x_gelu projector, features spliced at the image position,
Llama forward) with stock transformers' CLIP and Llama on the *original* weights, and compares it with the converted
checkpoint loaded through `trust_remote_code` in a process where llava_ext cannot be imported.
"""

import json
import os
import shutil
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HANG_GUARD_S, IMAGE_SIZE, PATCH_SIZE, build_tiny_tokenizer, tiny_llava_config
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import llava_ext.convert.io as convert_io
from llava_ext.cli import main
from llava_ext.convert import convert_checkpoint, push_to_hub

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # openai/clip-vit-large-patch14-336's preprocessor_config.json
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ORIGINAL_SPECIALS = ["<unk>", "<s>", "</s>"]  # Llama's; LLaVA-1.5 pads with <unk> and has no <image> token
ORIGINAL_VOCAB = len(ORIGINAL_SPECIALS) + 96
IMAGE_TOKEN_INDEX = -200  # the original code's placeholder id
PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"


# -------------------------------------------------------------------------------------------------------- fixtures
def build_original_tokenizer() -> PreTrainedTokenizerFast:
    """conftest's character-level tokenizer as the original LLaVA one: Llama specials, pad = <unk>, no <image>."""
    chars = list(string.printable[:95]) + ["\n"]
    vocab = {token: index for index, token in enumerate(ORIGINAL_SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """(llava_dir, clip_dir): an original-format LLaVA-1.5 checkpoint (2 shards) and a separate full CLIPModel."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("original")
    clip_dir, llava_dir = root / "clip-vit-tiny", root / "llava-v1.5-tiny"

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=16)
    text = CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=50, max_position_embeddings=16, projection_dim=16)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    clip.save_pretrained(clip_dir)
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({  # openai's file, scaled down
        "crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": IMAGE_SIZE,
    }))

    text_config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=ORIGINAL_VOCAB, max_position_embeddings=256,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama = LlamaForCausalLM(text_config)
    state = {key: value.contiguous() for key, value in llama.state_dict().items()}
    state["model.mm_projector.0.weight"] = torch.randn(32, 32) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(32) * 0.2
    state["model.mm_projector.2.weight"] = torch.randn(32, 32) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(32) * 0.2
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # saved by old transformers
    llava_dir.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for filename, keys in shards.items():
        save_file({key: state[key] for key in keys}, llava_dir / filename, metadata={"format": "pt"})
    weight_map = {key: filename for filename, keys in shards.items() for key in keys}
    (llava_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config = text_config.to_dict()
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "_name_or_path": "./checkpoints/vicuna",
        "mm_vision_tower": str(clip_dir), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048, "torch_dtype": "float32",
    })
    (llava_dir / "config.json").write_text(json.dumps(config))
    build_original_tokenizer().save_pretrained(llava_dir)
    return llava_dir, clip_dir


@pytest.fixture(scope="module")
def llava_hf_checkpoint(tmp_path_factory):
    """A stock transformers llava checkpoint with its processor, and the model it was saved from."""
    torch.manual_seed(1)
    hf_dir = tmp_path_factory.mktemp("llava-hf") / "llava-tiny-hf"
    model = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    model.save_pretrained(hf_dir)
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE, do_pad=True,
                                             image_mean=CLIP_MEAN, image_std=CLIP_STD)
    LlavaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=PATCH_SIZE,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(hf_dir)
    return hf_dir, model


def wide_image() -> Image.Image:
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (20, 48, 3), generator=generator, dtype=torch.uint8)  # (height, width, rgb)
    return Image.fromarray(pixels.numpy())


# ------------------------------------------------------------------------------------- the original forward, by hand
def reference_original_logits(llava_dir: Path, clip_dir: Path, image: Image.Image, prompt: str):
    """LLaVA-1.5's forward as the original repository computes it; returns (last-token logits, ids without image)."""
    # llava/mm_utils.py: expand2square with the mean colour, then the CLIP image processor (resize, crop, normalize)
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    width, height = image.size
    square = Image.new(image.mode, (max(width, height),) * 2, background)
    square.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    square = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)  # square: shortest edge == crop, no crop needed
    pixels = torch.tensor(np.asarray(square), dtype=torch.float32) / 255  # (H, W, 3)
    pixels = ((pixels - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(2, 0, 1)[None]  # (1, 3, H, W)

    # llava/model/multimodal_encoder/clip_encoder.py: hidden_states[-2], drop CLS ("patch")
    tower = CLIPVisionModel.from_pretrained(clip_dir).eval()
    states = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, patches, vision_hidden)

    # llava/model/multimodal_projector/builder.py: mlp2x_gelu = Linear, GELU, Linear
    weights = {}
    for filename in sorted(llava_dir.glob("*.safetensors")):
        weights.update(load_file(filename))
    hidden = F.linear(states, weights["model.mm_projector.0.weight"], weights["model.mm_projector.0.bias"])
    features = F.linear(F.gelu(hidden), weights["model.mm_projector.2.weight"], weights["model.mm_projector.2.bias"])

    # llava/mm_utils.py tokenizer_image_token: chunks around <image>, BOS once, -200 at the image
    tokenizer = build_original_tokenizer()
    before, after = prompt.split("<image>")
    ids = tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after).input_ids[1:]
    position = ids.index(IMAGE_TOKEN_INDEX)

    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in json.loads((llava_dir / "config.json").read_text()).items()
                                            if not k.startswith(("mm_", "architectures", "model_type"))}))
    llama_weights = {k: v for k, v in weights.items() if not k.startswith("model.mm_") and "rotary_emb" not in k}
    llama.load_state_dict(llama_weights, strict=True)
    llama.eval()
    embed = llama.get_input_embeddings()
    text_before = embed(torch.tensor([ids[:position]]))  # (1, before, text_hidden)
    text_after = embed(torch.tensor([ids[position + 1 :]]))  # (1, after, text_hidden)
    inputs_embeds = torch.cat([text_before, features, text_after], dim=1)  # (1, seq, text_hidden)
    logits = llama(inputs_embeds=inputs_embeds).logits[0, -1]
    return logits, [i for i in ids if i != IMAGE_TOKEN_INDEX], pixels


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # the checkpoint's own code must be enough
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, image_path, prompt, result = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    image_token_id = model.config.image_token_id
    torch.save({
        "logits": logits, "input_ids": inputs["input_ids"][0].tolist(), "pixel_values": inputs["pixel_values"],
        "image_token_id": image_token_id, "module": type(model).__module__,
        "processor": type(processor).__name__, "processor_module": type(processor).__module__,
        "chat": processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
            add_generation_prompt=True,
        ) if processor.chat_template else None,
    }, result)
    """
)


def run_without_llava_ext(tmp_path: Path, out: Path, image: Image.Image, prompt: str) -> dict:
    image_path, result = tmp_path / "wide.png", tmp_path / "result.pt"
    image.save(image_path)
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "remote.py", str(out), str(image_path), prompt, str(result)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(result)


# ------------------------------------------------------------------------------------------------------------- tests
def test_original_checkpoint_converts_with_logit_parity(original_checkpoint, tmp_path):
    llava_dir, clip_dir = original_checkpoint
    out = tmp_path / "llava-v1.5-tiny-ext"
    assert main(["convert", str(llava_dir), str(out), "--base-model", "liuhaotian/llava-v1.5-7b"]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_ext"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llava_ext.LlavaExtForConditionalGeneration"
    assert {"modeling_llava_ext.py", "configuration_llava_ext.py", "vision.py"} <= {p.name for p in out.iterdir()}
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["text_config"]["vocab_size"] == 128  # 99 + <image> + <pad>, padded to a multiple of 64
    assert config["image_token_index"] == ORIGINAL_VOCAB  # the first added token
    weights = load_file(out / "model.safetensors")
    assert not any(key.startswith("text_model") or "logit_scale" in key or "inv_freq" in key for key in weights)
    embed = weights["language_model.model.embed_tokens.weight"]
    original_embed = load_file(llava_dir / "model-00001-of-00002.safetensors") | load_file(
        llava_dir / "model-00002-of-00002.safetensors")
    original_embed = original_embed["model.embed_tokens.weight"]
    torch.testing.assert_close(embed[:ORIGINAL_VOCAB], original_embed, rtol=0, atol=0)
    torch.testing.assert_close(embed[ORIGINAL_VOCAB:], original_embed.mean(0).expand(128 - ORIGINAL_VOCAB, -1))
    card = (out / "README.md").read_text()
    for expected in ("library_name: transformers", "pipeline_tag: image-text-to-text",
                     "base_model: liuhaotian/llava-v1.5-7b", "trust_remote_code=True"):
        assert expected in card

    image = wide_image()
    expected_logits, expected_ids, expected_pixels = reference_original_logits(llava_dir, clip_dir, image, PROMPT)
    result = run_without_llava_ext(tmp_path, out, image, PROMPT)
    assert result["module"].startswith("transformers_modules.")
    assert result["processor_module"].startswith("transformers_modules.") and result["processor"] == "LlavaExtProcessor"
    assert result["chat"] == "<s>USER: <image>\nHi ASSISTANT:"  # LLaVA-1.5's conv_vicuna_v1 turn, no system prompt
    assert [i for i in result["input_ids"] if i != result["image_token_id"]] == expected_ids
    torch.testing.assert_close(result["pixel_values"], expected_pixels, rtol=0, atol=1e-5)
    diff = (result["logits"][:ORIGINAL_VOCAB] - expected_logits).abs().max().item()
    print(f"original -> llava_ext last-token logits: max abs diff {diff:.3e}")
    assert diff <= 1e-4


def test_llava_hf_round_trip_through_export(llava_hf_checkpoint, tmp_path):
    hf_dir, reference = llava_hf_checkpoint
    ext_dir, stock_dir = tmp_path / "ext", tmp_path / "stock"
    convert_checkpoint(hf_dir, ext_dir, max_shard_size="20KB", progress=False)

    index = json.loads((ext_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    converted = {}
    for filename in set(index["weight_map"].values()):
        converted.update(load_file(ext_dir / filename))
    source = load_file(hf_dir / "model.safetensors")
    assert converted.keys() == source.keys()
    assert all(torch.equal(converted[key], source[key]) for key in source)  # a re-label: weights unchanged
    assert json.loads((ext_dir / "config.json").read_text())["model_type"] == "llava_ext"

    assert main(["export", str(ext_dir), str(stock_dir)]) == 0
    files = {path.name for path in stock_dir.iterdir()}
    assert not any(name.endswith(".py") for name in files)
    for name in files:
        if name.endswith(".json"):
            assert "auto_map" not in json.loads((stock_dir / name).read_text()), name
    assert json.loads((stock_dir / "config.json").read_text())["model_type"] == "llava"

    stock = LlavaForConditionalGeneration.from_pretrained(stock_dir).eval()
    processor = LlavaProcessor.from_pretrained(stock_dir)
    inputs = processor(images=wide_image(), text="<image>\nWhat is shown?", return_tensors="pt")
    with torch.no_grad():
        expected, actual = reference(**inputs).logits, stock(**inputs).logits
    assert torch.equal(actual, expected)


def test_interrupted_conversion_leaves_nothing(llava_hf_checkpoint, tmp_path, monkeypatch):
    hf_dir, _ = llava_hf_checkpoint
    out = tmp_path / "out"
    real_write, calls = convert_io._write_safetensors_file, []

    def write_then_interrupt(path, plan, on_tensor):
        calls.append(path)
        if len(calls) == 2:  # the second shard: after real bytes are on disk
            raise KeyboardInterrupt
        real_write(path, plan, on_tensor)

    monkeypatch.setattr(convert_io, "_write_safetensors_file", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(hf_dir, out, max_shard_size="20KB", progress=False)
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary sibling left either


def test_existing_output_is_refused_unless_overwrite(llava_hf_checkpoint, tmp_path):
    hf_dir, _ = llava_hf_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"out already exists; choose another output directory or pass --overwrite"):
        main(["convert", str(hf_dir), str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    convert_checkpoint(hf_dir, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_truncated_safetensors_is_named(llava_hf_checkpoint, tmp_path):
    hf_dir, _ = llava_hf_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file .*download it again"):
        convert_checkpoint(broken, tmp_path / "out", progress=False)
    weights.write_bytes(b"\x05")  # not even a header
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        convert_checkpoint(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


class _NotATensor:
    pass


def test_pickled_bin_with_objects_is_refused(llava_hf_checkpoint, tmp_path):
    hf_dir, _ = llava_hf_checkpoint
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"language_model.lm_head.weight": torch.zeros(2), "payload": _NotATensor()},
               pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Refusing to load .*pytorch_model.bin"):
        convert_checkpoint(pickled, tmp_path / "out", progress=False)


def test_original_conversion_errors_name_the_problem(original_checkpoint, tmp_path):
    llava_dir, clip_dir = original_checkpoint
    variant = tmp_path / "variant"
    shutil.copytree(llava_dir, variant)
    config = json.loads((variant / "config.json").read_text())
    (variant / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match=r"mm_projector_type='linear' .* is unsupported.*mlp2x_gelu"):
        convert_checkpoint(variant, tmp_path / "out", progress=False)

    (variant / "config.json").write_text(json.dumps(config))
    shard = variant / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    save_file({**tensors, "model.mm_resampler.weight": torch.zeros(2)}, shard)
    with pytest.raises(ValueError, match=r"Unknown key 'model.mm_resampler.weight'"):
        convert_checkpoint(variant, tmp_path / "out", vision_tower=clip_dir, progress=False)
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_directory_in_one_commit(llava_hf_checkpoint, tmp_path, hub):
    hf_dir, _ = llava_hf_checkpoint
    calls = hub
    out = tmp_path / "llava-tiny-ext"
    assert main(["convert", str(hf_dir), str(out), "--push-to-hub", "me/llava-tiny-ext", "--private",
                 "--revision", "dev"]) == 0

    assert [call[0] for call in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == "me/llava-tiny-ext" and calls[0][2]["private"] is True
    assert calls[1][2]["branch"] == "dev"
    upload = calls[2][2]
    assert upload["repo_id"] == "me/llava-tiny-ext" and upload["revision"] == "dev"
    assert upload["commit_message"] == "Upload llava-tiny-ext with llava-ext"
    required = {"config.json", "model.safetensors", "modeling_llava_ext.py", "configuration_llava_ext.py",
                "vision.py", "README.md", "tokenizer.json", "tokenizer_config.json", "processor_config.json"}
    assert required <= set(upload["files"])
    assert set(upload["files"]) == {path.name for path in out.iterdir()}

    calls.clear()
    push_to_hub(out, "me/other", commit_message="v2")
    assert calls[0][2]["private"] is False and calls[-1][2]["commit_message"] == "v2"
    assert "create_branch" not in [call[0] for call in calls]


def test_offline_hub_id_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(SystemExit) as raised:
        main(["convert", "nobody-here/no-such-llava", str(tmp_path / "out")])
    message = str(raised.value.code)
    assert message.startswith("llava-ext convert: error: The checkpoint 'nobody-here/no-such-llava' is not a local")
    assert "could not be downloaded from the Hub" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["llava_ext", "stock"])
def test_model_card_usage_runs_and_feeds_one_bos(llava_hf_checkpoint, tmp_path, monkeypatch, target):
    """The usage example written into the model card runs as written (fp32 on CPU) on both checkpoint kinds."""
    from llava_ext.convert.hub import USAGE_REMOTE_CODE, USAGE_STOCK

    hf_dir, _ = llava_hf_checkpoint
    ext_dir = tmp_path / "ext"
    convert_checkpoint(hf_dir, ext_dir, progress=False)
    checkpoint, usage = ext_dir, USAGE_REMOTE_CODE
    if target == "stock":
        assert main(["export", str(ext_dir), str(tmp_path / "stock")]) == 0
        checkpoint, usage = tmp_path / "stock", USAGE_STOCK
    monkeypatch.chdir(tmp_path)
    wide_image().save("image.jpg")
    code = usage.format(repo=str(checkpoint)).replace("torch.float16", "torch.float32")
    namespace = {}
    exec(compile(code, "model_card_usage", "exec"), namespace)  # noqa: S102 - our own card's text
    ids = namespace["inputs"]["input_ids"][0].tolist()
    bos = namespace["processor"].tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS, not a second one from the tokenizer
    assert namespace["output"].shape[1] > len(ids)
