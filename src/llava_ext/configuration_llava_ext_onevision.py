"""LlavaExt-OneVision model configuration.

`LlavaExtOnevisionConfig` is transformers' `LlavaOnevisionConfig` with its own `model_type` and llava_ext's checks:
those of every llava_ext config, the anyres ones of `LlavaExtNextConfig`, `vision_aspect_ratio` of the form
`anyres_max_N`, and the `<video>` token inside the vocabulary. Every `LlavaOnevisionConfig` argument keeps its
meaning, so `LlavaExtOnevisionConfig(**LlavaOnevisionConfig(...).to_dict())` works. This file is copied next to
checkpoints for `trust_remote_code`: it imports only transformers, torch (through `anyres`) and its siblings.
"""

import inspect

from transformers import LlavaOnevisionConfig

from .anyres import max_tiles
from .configuration_llava_ext_next import AnyresConfigMixin


class LlavaExtOnevisionConfig(AnyresConfigMixin, LlavaOnevisionConfig):
    r"""
    Configuration of a LLaVA-OneVision model: a SigLIP tower, LLaVA's projector and a Qwen2 language model by default;
    a single image is anyres-tiled as in LLaVA-NeXT and its tile features shrunk to at most N tiles' worth
    (`vision_aspect_ratio="anyres_max_N"`); each of several images in one sample is its base view; a video is its
    frames' features, 2x bilinearly pooled.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's config. Defaults to SigLIP so400m/14 at 384 px, as `LlavaOnevisionConfig`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's config. Defaults to Qwen2 (151936-token vocabulary).
        image_token_index (`int`, *optional*, defaults to 151646):
            The id of the `<image>` placeholder token; also accepted as `image_token_id`.
        video_token_index (`int`, *optional*, defaults to 151647):
            The id of the `<video>` placeholder token; also accepted as `video_token_id`.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the projector's two linear layers.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"full"` keeps every token (SigLIP has no CLS), `"default"` drops the first.
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -1):
            Index (or indices, concatenated on the hidden axis) into the vision tower's hidden states.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have a bias.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Tie the language-model head to the input embeddings.
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            The `[height, width]` resolutions an image may be tiled to, each a multiple of `vision_config.image_size`.
            Defaults to every `[384 * i, 384 * j]` with `i, j` in 1..6.
        vision_aspect_ratio (`str`, *optional*, defaults to `"anyres_max_9"`):
            `"anyres_max_N"`: a single image keeps at most about N tiles' worth of tile features.

    Example:

    ```python
    >>> from llava_ext import LlavaExtOnevisionConfig, LlavaExtOnevisionForConditionalGeneration
    >>> config = LlavaExtOnevisionConfig(vision_aspect_ratio="anyres_max_4")
    >>> model = LlavaExtOnevisionForConditionalGeneration(config)
    ```
    """

    model_type = "llava_ext_onevision"
    stock_model_type = LlavaOnevisionConfig.model_type
    placeholder_tokens = (("image_token_index", "'<image>'"), ("video_token_index", "'<video>'"))

    def __init__(self, *args, **kwargs):
        kwargs = self.prepare_init_kwargs(args, kwargs)
        max_tiles(kwargs.get("vision_aspect_ratio", "anyres_max_9"))  # raises naming the form 'anyres_max_N'
        super().__init__(*args, **kwargs)

    # The arguments are the stock ones, passed through: say so to `inspect.signature` (transformers' model testers
    # build configs from it, and so do tools that read a config class's arguments).
    __init__.__signature__ = inspect.signature(LlavaOnevisionConfig.__init__)


__all__ = ["LlavaExtOnevisionConfig"]
