"""The stock export is what vLLM and SGLang serve: its config and processor files are those their llava code reads.

No GPU and no vLLM/SGLang here: the test reads the files `llava-ext export` writes, as those engines do.

- vLLM picks the model class from `config.json`'s `architectures` through its registry (vllm-project/vllm,
  `vllm/model_executor/models/registry.py`, `_MULTIMODAL_MODELS`:
  `"LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration")`); `vllm/model_executor/models/llava.py`
  then reads the config as transformers' `LlavaConfig` (`get_hf_config(LlavaConfig)`: `image_token_index`,
  `vision_feature_layer`, `vision_feature_select_strategy`, `projector_hidden_act`) and the processor as transformers'
  `LlavaProcessor` (`get_hf_processor(LlavaProcessor)`, loaded by `AutoProcessor`), whose chat template renders the
  `<image>` placeholders that it replaces with image features. A class it does not know (an `auto_map` to remote code)
  would need `--trust-remote-code` and transformers' fallback backend.
- SGLang maps the same architecture name to its `LlavaForConditionalGeneration` entry class
  (sgl-project/sglang, `python/sglang/srt/models/llava.py`) and loads the processor and chat template with
  transformers' `AutoProcessor` / the tokenizer's `chat_template`.
"""

import json

import pytest
from test_serve import tiny_checkpoint
from transformers import AutoConfig, AutoProcessor, LlavaConfig, LlavaProcessor

from llava_ext.convert import export_checkpoint


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engines")
    tiny_checkpoint(workdir / "llava-ext")
    return export_checkpoint(workdir / "llava-ext", workdir / "stock", progress=False)


def names_our_code(value) -> bool:
    return "LlavaExt" in json.dumps(value) or "llava_ext" in json.dumps(value)


def test_config_is_stock_llava(stock):
    config = json.loads((stock / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["model_type"] == "llava"
    assert "auto_map" not in config
    assert not names_our_code(config)
    assert type(AutoConfig.from_pretrained(stock)) is LlavaConfig  # what vLLM's get_hf_config(LlavaConfig) checks
    assert not list(stock.glob("*.py"))  # no remote code next to the weights


def test_processor_files_name_stock_transformers_classes(stock):
    files = {path.name: json.loads(path.read_text()) for path in stock.glob("*.json")
             if path.name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")}
    assert {"processor_config.json", "preprocessor_config.json"} & set(files)
    for name, content in files.items():
        assert "auto_map" not in content, name
        assert not names_our_code(content), name
    processor_class = next(content["processor_class"] for content in files.values() if "processor_class" in content)
    assert processor_class == "LlavaProcessor"
    image_processor = files.get("preprocessor_config.json") or files["processor_config.json"].get("image_processor")
    assert image_processor["image_processor_type"].startswith("LlavaImageProcessor") or \
        image_processor["image_processor_type"] == "CLIPImageProcessor"
    assert type(AutoProcessor.from_pretrained(stock)) is LlavaProcessor


def chat_template_of(stock) -> str:
    if (stock / "chat_template.jinja").exists():
        return (stock / "chat_template.jinja").read_text()
    for name in ("processor_config.json", "tokenizer_config.json", "chat_template.json"):
        path = stock / name
        if path.exists() and json.loads(path.read_text()).get("chat_template"):
            return json.loads(path.read_text())["chat_template"]
    raise AssertionError(f"no chat template in {sorted(p.name for p in stock.iterdir())}")


def test_chat_template_renders_the_image_placeholder(stock):
    """Rendered as vLLM and SGLang render it, with transformers' `apply_chat_template` (the template uses
    transformers' `{% generation %}` tag for assistant masks, which plain jinja2 does not know): two images give two
    `<image>` placeholders, which the processor then expands to each image's patch count."""
    assert "<image>" in chat_template_of(stock)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}]}]
    processor = AutoProcessor.from_pretrained(stock)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<image>") == 2 and "Both?" in text
