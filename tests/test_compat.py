"""Every item of llava_ext.compat resolves on the installed transformers and means what llava_ext assumes.

The nox sessions run this on the floor, a middle and the newest release, so a release that moves one of these
internals fails here, naming the item, rather than somewhere deep in training or chat.
"""

import inspect

import pytest
import torch
import transformers
from conftest import tiny_llava_config
from safetensors import safe_open
from transformers import AutoModel, LlavaForConditionalGeneration, Trainer

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, compat
from llava_ext.modeling_llava_ext import AUTO_MAP


def test_cache_kwarg_is_the_name_the_language_models_take():
    language_model = AutoModel.from_config(tiny_llava_config().text_config)
    assert compat.CACHE_KWARG in inspect.signature(language_model.forward).parameters
    reference = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    with torch.no_grad():
        output = reference(input_ids=torch.tensor([[1, 40, 41]]), use_cache=True)
    assert compat.CACHE_KWARG in output  # transformers' own LLaVA returns the cache under this name


def test_trainer_sampler_hook_exists_with_the_argument_llava_ext_overrides():
    hook = getattr(Trainer, compat.TRAIN_SAMPLER_HOOK, None)
    assert callable(hook), f"Trainer.{compat.TRAIN_SAMPLER_HOOK} is gone: update compat.TRAIN_SAMPLER_HOOK"
    assert "train_dataset" in inspect.signature(hook).parameters


@pytest.mark.parametrize(
    "name", ["AutoImageProcessor", "BaseStreamer", "CompileConfig", "LengthGroupedSampler", "TrainOutput",
             "custom_object_save", "get_last_checkpoint", "load_image", "tqdm"],
)
def test_each_borrowed_name_is_the_real_thing(name):
    item = getattr(compat, name)
    assert callable(item)
    assert "Placeholder" not in getattr(item, "__qualname__", "")  # not a torchvision-gated dummy


def test_models_made_here_save_the_stock_key_layout(tmp_path):
    """The conversion-mapping registration (compat) makes a from-scratch model save what stock LLaVA saves."""
    reference = LlavaForConditionalGeneration(tiny_llava_config())
    ours = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict()))
    reference.save_pretrained(tmp_path / "stock")
    ours.save_pretrained(tmp_path / "ours")
    def keys(path):
        with safe_open(path / "model.safetensors", "pt") as handle:
            return sorted(handle.keys())

    assert keys(tmp_path / "ours") == keys(tmp_path / "stock")


def test_every_auto_class_of_stock_llava_resolves_to_ours():
    """Pipelines and tools pick models through whichever Auto tables hold `llava`; each must find llava_ext too."""
    found = compat.auto_model_classes_for("llava")
    assert transformers.AutoModelForImageTextToText in found and transformers.AutoModel in found
    config = LlavaExtConfig(**tiny_llava_config().to_dict())
    for auto_class in found:
        model = auto_class.from_config(config)
        expected = "LlavaExtModel" if auto_class is transformers.AutoModel else "LlavaExtForConditionalGeneration"
        assert type(model).__name__ == expected, auto_class.__name__
    assert {auto_class.__name__ for auto_class in found} <= set(AUTO_MAP)  # saved checkpoints map them too


def test_transformers_serve_internals_are_where_llava_ext_serve_reads_them():
    """`llava-ext serve` imports these by name when it starts; a release that moves one must fail here, by name."""
    import importlib

    pytest.importorskip("fastapi", reason="transformers serve needs its `serving` extra (llava-ext[serve])")
    serve_command = getattr(importlib.import_module(compat.SERVE_MODULE), "Serve", None)
    assert serve_command is not None, f"{compat.SERVE_MODULE}.Serve is gone: update compat.SERVE_MODULE"
    assert callable(getattr(importlib.import_module(compat.SERVER_MODULE), "build_server", None))
    tables = importlib.import_module(compat.MODEL_TABLES_MODULE)
    for name in compat.SERVE_MODEL_TABLES:
        assert "llava" in getattr(tables, name), f"{compat.MODEL_TABLES_MODULE}.{name} no longer lists llava"
