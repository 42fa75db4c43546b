"""LlavaExt-NeXT against transformers' LlavaNextForConditionalGeneration on the same random weights.

Inputs come from transformers' own LlavaNextProcessor and PIL image processor (not llava_ext's), so parity does not
depend on our processors: images of sizes no multiple of the patch (8) or tile (32) size, a batch of mixed sizes and a
sample with two images; stock checkpoints (5.x save, 4.x layout) load, ours save the stock layout, the shipped code
loads in a Python without llava_ext.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, IMAGE_TOKEN_ID, build_tiny_tokenizer, isolated_env, tiny_llava_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_ext import ImageTokenMismatchError, LlavaExtNextConfig, LlavaExtNextForConditionalGeneration
from llava_ext.modeling_llava_ext_next import LlavaExtNextModel

TILE, PATCH = 32, 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# (height, width): wide, tall, square, no multiple of patch or tile, tiny
IMAGE_SIZES = [(50, 20), (33, 97), (64, 64), (45, 61), (7, 9)]

PARITY_CASES = {
    "clip-llama-layer-2-default": dict(vision="clip", text="llama", vision_feature_layer=-2),
    "clip-mistral-layers-3-1-default": dict(vision="clip", text="mistral", vision_feature_layer=[-3, -1]),
    "siglip-qwen2-layer-1-full": dict(
        vision="siglip", text="qwen2", vision_feature_layer=-1, vision_feature_select_strategy="full"
    ),
}


def tiny_next_config(vision="clip", text="llama", **kwargs) -> LlavaNextConfig:
    """transformers' LlavaNextConfig with conftest's tiny towers (image 32 / patch 8) and tiny anyres pinpoints."""
    base = tiny_llava_config(vision, text)
    kwargs.setdefault("image_grid_pinpoints", PINPOINTS)
    kwargs.setdefault("image_token_index", IMAGE_TOKEN_ID)
    kwargs.setdefault("image_seq_length", (TILE // PATCH) ** 2)
    return LlavaNextConfig(vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(), **kwargs)


def build_pair(attn_implementation="eager", **case):
    """The reference and ours from one random tiny config, ours holding the reference's weights."""
    ref_config = tiny_next_config(**case)
    reference = LlavaNextForConditionalGeneration._from_config(ref_config, attn_implementation=attn_implementation)
    ours = LlavaExtNextForConditionalGeneration._from_config(
        LlavaExtNextConfig(**ref_config.to_dict()), attn_implementation=attn_implementation
    )
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    return reference.eval(), ours.eval()


def reference_processor(config) -> LlavaNextProcessor:
    """transformers' processor for a tiny config: tiles of 32 px, the CLS counted for CLIP."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(config.vision_config.model_type == "clip_vision_model"),
    )


def random_images(sizes, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for height, width in sizes]


def processed_batch(config, prompts=("<image>What is it?", "A <image> and <image>, compare."), sizes=None) -> dict:
    """A left-padded batch from transformers' processor: sample 0 one image, sample 1 two (mixed sizes)."""
    sizes = sizes or IMAGE_SIZES[: sum(prompt.count("<image>") for prompt in prompts)]
    batch = reference_processor(config)(
        text=list(prompts), images=random_images(sizes), return_tensors="pt", padding=True
    )
    return dict(batch)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_parity_with_reference(case, attn_implementation):
    reference, ours = build_pair(attn_implementation, **case)
    batch = processed_batch(reference.config)
    assert batch["pixel_values"].shape[:2] == (3, 5)  # three images of 4, 4 and 5 crops, padded to 5
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = reference(**batch, labels=labels)
        got = ours(**batch, labels=labels)
    assert (expected.logits - got.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)

    expected_tokens = reference.generate(**batch, max_new_tokens=6, do_sample=False)
    got_tokens = ours.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(expected_tokens, got_tokens)


@pytest.mark.parametrize("size", IMAGE_SIZES + [(1, 300), (300, 1), (97, 33), (31, 31)])
def test_each_image_size_alone_matches_reference_and_its_token_count(size):
    reference, ours = build_pair(vision="clip", text="llama")
    batch = processed_batch(reference.config, prompts=("<image>Describe.",), sizes=[size])
    torch.testing.assert_close(logits(ours, batch), logits(reference, batch), rtol=0, atol=1e-4)
    # the count our model checks against is the one transformers' processor expanded to
    expected_count = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert ours.model.num_image_tokens(batch["image_sizes"], "default") == [expected_count]


def test_get_image_features_and_pack_equal_the_reference():
    reference, ours = build_pair(vision="clip", text="llama")
    batch = processed_batch(reference.config)
    with torch.no_grad():
        expected = reference.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        got = ours.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    for got_image, expected_image in zip(got, expected):
        torch.testing.assert_close(got_image, expected_image, rtol=0, atol=1e-5)


def test_image_token_mismatch_raises_before_the_vision_tower():
    reference, ours = build_pair(vision="clip", text="llama")
    calls = []
    ours.model.vision_tower.embeddings.register_forward_hook(lambda *args: calls.append(1))
    batch = processed_batch(reference.config)
    expected_total = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())  # transformers' processor's count

    too_few = batch["input_ids"].clone()
    too_few[1, too_few[1].tolist().index(IMAGE_TOKEN_ID)] = 40
    with pytest.raises(ImageTokenMismatchError, match=rf"{expected_total - 1} image tokens.*{expected_total} features"):
        ours(**{**batch, "input_ids": too_few})

    no_placeholder = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, 40)
    with pytest.raises(ValueError, match=r"0 image tokens.*no '<image>' placeholder"):
        ours(**{**batch, "input_ids": no_placeholder})

    truncated = {**batch, "input_ids": batch["input_ids"][:, :-20], "attention_mask": batch["attention_mask"][:, :-20]}
    with pytest.raises(ValueError, match=r"truncation.*anyres tiles differently"):
        ours(**truncated)

    # image_sizes that are not the processed images' (here swapped): the tile grid differs, so does the count
    with pytest.raises(ValueError, match=r"image_sizes and image_grid_pinpoints give|do not match"):
        ours(**{**batch, "image_sizes": batch["image_sizes"].flip(-1)})

    with pytest.raises(ValueError, match=r"without image_sizes.*pass the processor's `image_sizes`"):
        ours(**{key: value for key, value in batch.items() if key != "image_sizes"})
    assert calls == []


def test_config_round_trips_the_stock_config_dict(tmp_path):
    stock = tiny_next_config(vision_feature_layer=[-3, -1], multimodal_projector_bias=False)
    ours = LlavaExtNextConfig(**stock.to_dict())
    assert ours.model_type == "llava_ext_next"
    assert {**ours.to_dict(), "model_type": "llava_next"} == stock.to_dict()
    stock.save_pretrained(tmp_path)  # a stock config.json reads as ours
    loaded = LlavaExtNextConfig.from_pretrained(tmp_path)
    assert loaded.image_grid_pinpoints == PINPOINTS and loaded.vision_feature_layer == [-3, -1]


def test_config_rejects_bad_combinations_naming_the_fix():
    with pytest.raises(ValueError, match=r"image_grid_pinpoints has \[\[48, 64\]\].*image_size=32.*multiples of 32"):
        LlavaExtNextConfig(**tiny_next_config(image_grid_pinpoints=[[48, 64], [64, 64]]).to_dict())
    with pytest.raises(ValueError, match=r"image_grid_pinpoints=\[\] is not a list of \[height, width\] pairs"):
        LlavaExtNextConfig(**{**tiny_next_config().to_dict(), "image_grid_pinpoints": []})
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='cls'.*'default'.*'full'"):
        LlavaExtNextConfig(**{**tiny_next_config().to_dict(), "vision_feature_select_strategy": "cls"})
    with pytest.raises(ValueError, match=r"image_token_index=500 is outside the text vocabulary"):
        LlavaExtNextConfig(**tiny_next_config(image_token_index=500).to_dict())


def _keys(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def test_stock_checkpoints_load_with_equal_logits(tmp_path):
    reference, _ = build_pair(vision="clip", text="llama")
    batch = processed_batch(reference.config)
    expected = logits(reference, batch)

    reference.save_pretrained(tmp_path / "saved")  # transformers 5.x: the 4.x names on disk
    assert "image_newline" in _keys(tmp_path / "saved")
    in_memory = tmp_path / "in-memory"  # the in-memory 5.x names (model.image_newline, model.language_model.*)
    in_memory.mkdir()
    state = {key: value.contiguous().clone() for key, value in reference.state_dict().items()}
    save_file(state, in_memory / "model.safetensors", metadata={"format": "pt"})
    (in_memory / "config.json").write_text(json.dumps(reference.config.to_dict()))
    assert "model.image_newline" in state

    for directory in (tmp_path / "saved", in_memory):
        ours = LlavaExtNextForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
        assert type(ours.config) is LlavaExtNextConfig
        assert (logits(ours, batch) - expected).abs().max().item() <= 1e-5
        assert torch.equal(ours.model.image_newline, reference.model.image_newline)


def test_ours_save_the_stock_layout_and_load_in_transformers_class(tmp_path):
    reference, ours = build_pair(vision="siglip", text="qwen2", vision_feature_select_strategy="full")
    batch = processed_batch(reference.config)
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "reference")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "reference")

    stock = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert (logits(stock, batch) - logits(reference, batch)).abs().max().item() == 0
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(reloaded) is LlavaExtNextForConditionalGeneration
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


def test_a_stock_config_builds_our_model_with_the_stock_layout(tmp_path):
    reference, _ = build_pair(vision="clip", text="llama")
    ours = LlavaExtNextForConditionalGeneration(reference.config)  # a transformers LlavaNextConfig
    assert type(ours.config) is LlavaExtNextConfig and type(ours.model) is LlavaExtNextModel
    ours.load_state_dict(reference.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    assert _keys(tmp_path / "ours") == _keys_of_reference(reference, tmp_path / "reference")


def _keys_of_reference(reference, directory) -> set[str]:
    reference.save_pretrained(directory)
    return _keys(directory)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    checkpoint, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        result = {
            "classes": [type(config).__name__, type(model).__name__, type(base).__name__],
            "modules": sorted({type(m).__module__.split(".")[0] for m in (config, model, base)}),
            "logits": model(**inputs).logits,
            "tokens": model.generate(**inputs, max_new_tokens=5, do_sample=False),
        }
    torch.save(result, out_path)
    """
)


def run_remote_code_check(model, batch, tmp_path) -> dict:
    """Save `model` with its code, load it in a fresh Python that cannot import llava_ext; that run's results."""
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save(batch, tmp_path / "inputs.pt")
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_trust_remote_code_round_trip_without_llava_ext(tmp_path):
    _, ours = build_pair("sdpa", vision="clip", text="llama")  # the attention the remote load picks by default
    batch = processed_batch(ours.config)
    result = run_remote_code_check(ours, batch, tmp_path)
    shipped = sorted(path.name for path in (tmp_path / "checkpoint").glob("*.py"))
    assert shipped == [
        "anyres.py", "configuration_llava_ext.py", "configuration_llava_ext_next.py", "modeling_llava_ext.py",
        "modeling_llava_ext_next.py", "vision.py",
    ]
    assert result["classes"] == ["LlavaExtNextConfig", "LlavaExtNextForConditionalGeneration", "LlavaExtNextModel"]
    assert result["modules"] == ["transformers_modules"]  # the checkpoint's copy, not an installed llava_ext
    torch.testing.assert_close(result["logits"], logits(ours, batch), rtol=0, atol=1e-5)
    assert torch.equal(result["tokens"], ours.generate(**batch, max_new_tokens=5, do_sample=False))


def test_get_image_features_states_follow_the_vision_config_as_the_reference():
    """Unasked, the reference's tower still returns every hidden state, and its attentions when its config says so;
    ours returns them when the argument or the vision config asks (the config is what transformers' tests set)."""
    reference, ours = build_pair(vision="clip", text="llama")
    batch = processed_batch(reference.config)
    args = (batch["pixel_values"], batch["image_sizes"])
    for model in (reference, ours):
        model.config.vision_config.output_hidden_states = True
        model.config.vision_config.output_attentions = True
    with torch.no_grad():
        expected, got = reference.get_image_features(*args), ours.get_image_features(*args)
        by_argument = ours.model.get_image_features(*args, output_hidden_states=True, output_attentions=False)
    layers = reference.config.vision_config.num_hidden_layers
    assert len(got.hidden_states) == len(expected.hidden_states) == layers + 1
    assert len(got.attentions) == len(expected.attentions) == layers
    assert all(state is not None for state in got.hidden_states + got.attentions)
    # 5.24+'s reference keeps only the states its feature layer reads (None elsewhere); compare where it has them
    pairs = zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions)
    compared = [torch.testing.assert_close(g, e, rtol=0, atol=1e-5) for g, e in pairs if e is not None]
    assert len(compared) >= layers + 1
    assert len(by_argument.hidden_states) == layers + 1 and by_argument.attentions is None


@pytest.mark.parametrize("model_class", [LlavaExtNextModel, LlavaExtNextForConditionalGeneration])
def test_a_loaded_model_saves_the_keys_a_new_one_saves(model_class, tmp_path):
    """transformers saves a loaded model by reversing the renames that matched on loading: the base model's renames
    must name its own keys, or a checkpoint read and saved again changes layout (LlavaNextModel's does not)."""
    reference, _ = build_pair(vision="clip", text="llama")
    stock_class = {LlavaExtNextModel: "LlavaNextModel"}.get(model_class, "LlavaNextForConditionalGeneration")
    import transformers

    stock = getattr(transformers, stock_class)(reference.config)
    stock.save_pretrained(tmp_path / "stock")
    model = model_class(reference.config)
    model.save_pretrained(tmp_path / "new")
    model_class.from_pretrained(tmp_path / "new").save_pretrained(tmp_path / "again")
    assert _keys(tmp_path / "new") == _keys(tmp_path / "again") == _keys(tmp_path / "stock")


def test_generation_classes_name_generation_mixin_among_their_bases():
    from transformers import GenerationMixin

    assert GenerationMixin in LlavaExtNextForConditionalGeneration.__bases__
