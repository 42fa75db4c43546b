"""LlavaExtConfig: every LlavaConfig argument with the same meaning, and clear errors for bad values."""

import pytest
from conftest import VOCAB_SIZE, tiny_llava_config
from transformers import AutoConfig, LlavaConfig

from llava_ext import LlavaExtConfig

SHARED_FIELDS = (
    "image_token_index", "image_seq_length", "projector_hidden_act", "vision_feature_select_strategy",
    "vision_feature_layer", "multimodal_projector_bias", "tie_word_embeddings",
)


def test_accepts_a_llava_config_dict():
    reference = tiny_llava_config(
        text="qwen2", vision_feature_layer=[-3, -1], projector_hidden_act="gelu_new",
        multimodal_projector_bias=False, image_seq_length=17,
    )
    ours = LlavaExtConfig(**reference.to_dict())
    assert ours.model_type == "llava_ext"
    for field in SHARED_FIELDS:
        assert getattr(ours, field) == getattr(reference, field), field
    assert ours.text_config.to_dict() == reference.text_config.to_dict()
    assert ours.vision_config.to_dict() == reference.vision_config.to_dict()


def test_image_token_id_alias():
    kwargs = tiny_llava_config().to_dict()
    kwargs.pop("image_token_index")
    config = LlavaExtConfig(**kwargs, image_token_id=7)
    assert config.image_token_index == 7


def test_default_is_llava_1_5_7b_shaped():
    config = LlavaExtConfig()
    reference = LlavaConfig()
    assert config.vision_config.to_dict() == reference.vision_config.to_dict()
    assert config.text_config.model_type == "llama"
    assert config.text_config.vocab_size == 32064  # <image> (32000) must be inside the vocabulary
    assert config.image_token_index == 32000


def test_stock_llava_config_reads_as_ours(tmp_path, caplog):
    tiny_llava_config().save_pretrained(tmp_path)
    config = LlavaExtConfig.from_pretrained(tmp_path)
    assert config.model_type == "llava_ext"
    assert "to instantiate a model of type" not in caplog.text
    assert type(AutoConfig.from_pretrained(tmp_path)) is LlavaConfig  # AutoConfig still reads stock as stock


def test_round_trip_through_auto_config(tmp_path):
    config = LlavaExtConfig(**tiny_llava_config(vision_feature_layer=[-2, 0]).to_dict())
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is LlavaExtConfig
    assert loaded.vision_feature_layer == [-2, 0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy='cls'.*'default'.*'full'"),
        ({"vision_feature_layer": 4}, r"\[4\] outside.*3 layers.*-4\.\.3"),
        ({"vision_feature_layer": [-1, -5]}, r"\[-5\] outside.*-4\.\.3"),
        ({"vision_feature_layer": []}, r"selects no vision features"),
        ({"image_token_index": VOCAB_SIZE}, rf"image_token_index={VOCAB_SIZE} is outside.*0\.\.{VOCAB_SIZE - 1}"),
        ({"image_token_index": -200}, r"image_token_index=-200 is outside.*llava-ext convert"),
    ],
)
def test_invalid_values_raise_value_error(overrides, message):
    kwargs = {**tiny_llava_config().to_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        LlavaExtConfig(**kwargs)
