"""`llava-ext export` for the anyres families: llava_ext_next -> stock llava_next, llava_ext_onevision -> stock
llava_onevision. The result has no code and no `auto_map`, names transformers' own classes, and transformers' classes
load it, in a Python where llava_ext cannot be imported, with our model's logits and our processor's inputs.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, build_tiny_tokenizer, isolated_env, tiny_llava_config
from PIL import Image
from test_image_processing_llava_ext_next import NEXT, ONEVISION
from test_modeling_llava_ext_next import tiny_next_config
from transformers import (
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)

from llava_ext import (
    LlavaExtNextConfig,
    LlavaExtNextForConditionalGeneration,
    LlavaExtNextImageProcessor,
    LlavaExtNextProcessor,
    LlavaExtOnevisionConfig,
    LlavaExtOnevisionImageProcessor,
    LlavaExtOnevisionProcessor,
)
from llava_ext.cli import main
from llava_ext.compat import AutoImageProcessor  # the real class where torchvision is missing (5.17)
from llava_ext.modeling_llava_ext_onevision import LlavaExtOnevisionForConditionalGeneration

PATCH = 8
SIZES = [(50, 20), (33, 97), (45, 61)]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None  # LlavaOnevisionProcessor's video processor


class OnevisionProcessorWithoutVideo(LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor without its video processor (which needs torchvision): images only,
    every other argument read from the checkpoint's processor_config.json as the stock class reads it."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        super().__init__(
            image_processor, tokenizer, num_image_tokens=num_image_tokens, chat_template=chat_template,
            vision_feature_select_strategy=vision_feature_select_strategy, image_token=image_token,
            video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )


def onevision_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def next_checkpoint(directory):
    """Our NeXT model (CLIP + Llama) and processor, saved as llava_ext writes them (code and auto_map included)."""
    model = LlavaExtNextForConditionalGeneration(LlavaExtNextConfig(**tiny_next_config().to_dict())).eval()
    processor = LlavaExtNextProcessor(
        LlavaExtNextImageProcessor(**NEXT), build_tiny_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


def onevision_checkpoint(directory):
    """Our OneVision model (SigLIP + Qwen2) and processor, the `<video>` id the tokenizer's."""
    tokenizer = onevision_tokenizer()
    base = tiny_llava_config("siglip", "qwen2")
    config = LlavaExtOnevisionConfig(**LlavaOnevisionConfig(
        vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION["image_grid_pinpoints"], vision_aspect_ratio="anyres_max_2",
    ).to_dict())
    model = LlavaExtOnevisionForConditionalGeneration(config).eval()
    processor = LlavaExtOnevisionProcessor(
        LlavaExtOnevisionImageProcessor(**ONEVISION), tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
    )
    return model, processor


FAMILIES = {
    "next": (next_checkpoint, "llava_next", "LlavaNextForConditionalGeneration", LlavaNextForConditionalGeneration),
    "onevision": (
        onevision_checkpoint, "llava_onevision", "LlavaOnevisionForConditionalGeneration",
        LlavaOnevisionForConditionalGeneration,
    ),
}
PROMPTS = ("<image>What is it?", "A <image> and <image>, compare.")


def images() -> list[list[Image.Image]]:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    return [pictures[:1], pictures[1:]]  # one list per sample: sample 1 holds two images


def exported(family, tmp_path):
    """Our checkpoint of `family` saved and exported with the CLI; (our model, our processor, stock directory)."""
    build = FAMILIES[family][0]
    model, processor = build(tmp_path / "ext")
    model.save_pretrained(tmp_path / "ext")
    processor.save_pretrained(tmp_path / "ext")
    assert (tmp_path / "ext" / f"modeling_llava_ext_{family}.py").is_file()
    assert main(["export", str(tmp_path / "ext"), str(tmp_path / "stock")]) == 0
    return model, processor, tmp_path / "stock"


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_stock_files_naming_only_transformers_classes(family, tmp_path):
    _, stock_type, architecture, _ = FAMILIES[family]
    _, _, stock_dir = exported(family, tmp_path)
    files = {path.name for path in stock_dir.iterdir()}
    assert not any(name.endswith(".py") for name in files), files
    for name in files:
        if name.endswith(".json"):
            text = (stock_dir / name).read_text()
            assert "auto_map" not in json.loads(text) and "LlavaExt" not in text and "llava_ext" not in text, name
    config = json.loads((stock_dir / "config.json").read_text())
    assert config["model_type"] == stock_type and config["architectures"] == [architecture]
    processor_class = {"next": "LlavaNextProcessor", "onevision": "LlavaOnevisionProcessor"}[family]
    assert json.loads((stock_dir / "processor_config.json").read_text())["processor_class"] == processor_class
    assert json.loads((stock_dir / "tokenizer_config.json").read_text())["processor_class"] == processor_class
    if family == "onevision":  # the split layout llava-hf's OneVision checkpoints have
        image = json.loads((stock_dir / "preprocessor_config.json").read_text())
        video = json.loads((stock_dir / "video_preprocessor_config.json").read_text())
        assert image["image_processor_type"] == "LlavaOnevisionImageProcessor"
        assert video["video_processor_type"] == "LlavaOnevisionVideoProcessor"
        assert video["size"] == {"height": 32, "width": 32}
        processor = json.loads((stock_dir / "processor_config.json").read_text())
        assert processor["num_image_tokens"] == (32 // PATCH) ** 2
        assert processor["vision_aspect_ratio"] == "anyres_max_2"


def test_next_export_loads_in_transformers_with_equal_inputs_and_logits(tmp_path):
    ours, our_processor, stock_dir = exported("next", tmp_path)
    stock = LlavaNextForConditionalGeneration.from_pretrained(stock_dir).eval()
    stock_processor = AutoProcessor.from_pretrained(stock_dir)
    assert type(stock_processor) is LlavaNextProcessor
    flat = [image for sample in images() for image in sample]
    expected = our_processor(text=list(PROMPTS), images=flat, return_tensors="pt", padding=True)
    got = stock_processor(text=list(PROMPTS), images=flat, return_tensors="pt", padding=True)
    assert set(got.keys()) == set(expected.keys())
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    with torch.no_grad():
        assert (stock(**got).logits - ours(**expected).logits).abs().max().item() <= 1e-5
    assert torch.equal(
        stock.generate(**got, max_new_tokens=5, do_sample=False),
        ours.generate(**expected, max_new_tokens=5, do_sample=False),
    )


def test_onevision_export_loads_in_transformers_with_equal_inputs_and_logits(tmp_path):
    ours, our_processor, stock_dir = exported("onevision", tmp_path)
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(stock_dir).eval()
    # transformers' processor read from the exported files (its torchvision video processor left out where missing)
    stock_processor = (AutoProcessor if HAS_TORCHVISION else OnevisionProcessorWithoutVideo).from_pretrained(stock_dir)
    assert type(AutoImageProcessor.from_pretrained(stock_dir)).__name__.startswith("LlavaOnevisionImageProcessor")
    expected = our_processor(text=list(PROMPTS), images=images(), return_tensors="pt", padding=True)
    got = stock_processor(text=list(PROMPTS), images=images(), return_tensors="pt", padding=True)
    assert (stock_processor.num_image_tokens, stock_processor.vision_aspect_ratio) == (16, "anyres_max_2")
    assert got["batch_num_images"].tolist() == [1, 2]
    assert set(got.keys()) == set(expected.keys())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        stock_logits, our_logits = stock(**got).logits, ours(**expected).logits
    assert (stock_logits - our_logits).abs().max().item() <= 1e-5
    assert torch.equal(
        stock.generate(**got, max_new_tokens=5, do_sample=False),
        ours.generate(**expected, max_new_tokens=5, do_sample=False),
    )


STOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    # transformers' own AutoImageProcessor where torchvision is missing (the top-level name is a stub there on 5.17)
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    checkpoint, inputs_path, out_path = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    parts = [AutoConfig.from_pretrained(checkpoint), model, AutoImageProcessor.from_pretrained(checkpoint),
             AutoTokenizer.from_pretrained(checkpoint)]
    with torch.no_grad():
        logits = model(**torch.load(inputs_path)).logits
    torch.save({"classes": [type(part).__name__ for part in parts],
                "modules": sorted({type(part).__module__.split(".")[0] for part in parts}),
                "logits": logits}, out_path)
    """
)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_where_llava_ext_cannot_be_imported(family, tmp_path):
    ours, processor, stock_dir = exported(family, tmp_path)
    flat = images() if family == "onevision" else [image for sample in images() for image in sample]
    batch = dict(processor(text=list(PROMPTS), images=flat, return_tensors="pt", padding=True))
    torch.save(batch, tmp_path / "inputs.pt")
    completed = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(stock_dir), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    stock_name = {"next": "LlavaNext", "onevision": "LlavaOnevision"}[family]
    assert result["classes"][:2] == [f"{stock_name}Config", f"{stock_name}ForConditionalGeneration"]
    assert result["classes"][2].startswith(f"{stock_name}ImageProcessor")
    assert result["modules"] == ["transformers"]
    with torch.no_grad():
        expected = ours(**batch).logits
    assert (result["logits"] - expected).abs().max().item() <= 1e-5


def test_export_names_the_families_it_takes(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(SystemExit, match=r"model_type='qwen2_vl'.*llava_ext_next.*llava_onevision checkpoint"):
        main(["export", str(tmp_path / "other"), str(tmp_path / "out")])
