"""A checkpoint saved by llava_ext 0.1.0 (transformers 5.23) still opens in the installed llava_ext, on any release.

The fixture was written once by tests/fixtures/make_v010_fixture.py with llava_ext 0.1.0 and transformers 5.23.0;
its `expected.pt` holds what 0.1.0 computed, so these comparisons are against an independent, frozen result.
"""

import json
from pathlib import Path

import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_ext import LlavaExtForConditionalGeneration, LlavaExtProcessor

FIXTURE = Path(__file__).parent / "fixtures" / "llava_ext-0.1.0-tiny"
PROMPT = "USER: <image>\nWhat colour? ASSISTANT:"


def test_the_fixture_is_a_0_1_0_checkpoint_in_the_stock_key_layout():
    config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    assert config["transformers_version"] == "5.23.0" and config["model_type"] == "llava_ext"
    assert "LlavaModelOutputWithPast" in (FIXTURE / "checkpoint" / "modeling_llava_ext.py").read_text()  # old code


def test_0_1_0_checkpoint_loads_into_the_installed_llava_ext_with_equal_logits():
    expected = torch.load(FIXTURE / "expected.pt")
    model = AutoModelForImageTextToText.from_pretrained(FIXTURE / "checkpoint").eval()
    processor = AutoProcessor.from_pretrained(FIXTURE / "checkpoint")
    assert type(model) is LlavaExtForConditionalGeneration  # the installed class, not the checkpoint's old copy
    assert type(processor) is LlavaExtProcessor

    inputs = processor(text=PROMPT, images=PIL.Image.open(FIXTURE / "image.png"), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    assert tokens.tolist() == expected["greedy_tokens"].tolist()
