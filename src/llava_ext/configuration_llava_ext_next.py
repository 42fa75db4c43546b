"""LlavaExt-NeXT model configuration.

`LlavaExtNextConfig` is transformers' `LlavaNextConfig` with its own `model_type` and llava_ext's construction-time
checks (`LlavaExtConfigMixin`), plus the anyres ones: every `image_grid_pinpoints` entry must tile into whole
`vision_config.image_size` crops, or the model's tile grid and the processor's crops disagree. Every `LlavaNextConfig`
argument keeps its meaning, so `LlavaExtNextConfig(**LlavaNextConfig(...).to_dict())` works. This file is copied next
to checkpoints for `trust_remote_code`: it imports only transformers and its siblings.
"""

import inspect

from transformers import LlavaNextConfig

from .configuration_llava_ext import DEFAULT_TEXT_CONFIG, LlavaExtConfigMixin


class AnyresConfigMixin(LlavaExtConfigMixin):
    """The checks of an anyres config (NeXT, OneVision): `image_grid_pinpoints` is a non-empty list of
    `[height, width]` pairs, each side a positive multiple of the tower's `image_size` (the tile side)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_image_grid_pinpoints()

    def _validate_image_grid_pinpoints(self):
        pinpoints, tile = self.image_grid_pinpoints, getattr(self.vision_config, "image_size", None)
        shapes_ok = isinstance(pinpoints, (list, tuple)) and len(pinpoints) > 0
        shapes_ok = shapes_ok and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints)
        if not shapes_ok:
            raise ValueError(
                f"image_grid_pinpoints={pinpoints!r} is not a list of [height, width] pairs; give the resolutions an "
                "image may be tiled to, e.g. [[336, 672], [672, 336], [672, 672]] for a 336 px tower."
            )
        if not isinstance(tile, int):  # a tower without a fixed input size: nothing to check against
            return
        bad = [list(p) for p in pinpoints if not all(isinstance(s, int) and s > 0 and s % tile == 0 for s in p)]
        if bad:
            raise ValueError(
                f"image_grid_pinpoints has {bad}, not whole multiples of the vision tower's image_size={tile} (the "
                f"tile side): the model would lay out a different tile grid than the processor crops. Use multiples "
                f"of {tile}, e.g. [[{tile}, {2 * tile}], [{2 * tile}, {tile}], [{2 * tile}, {2 * tile}]]."
            )


class LlavaExtNextConfig(AnyresConfigMixin, LlavaNextConfig):
    r"""
    Configuration of a LLaVA-NeXT (LLaVA-1.6) model: LLaVA-1.5's vision tower, projector and language model, with
    "anyres" images: each image is a base view plus tiles of the best of `image_grid_pinpoints`, and an
    `image_newline` embedding ends every row of tile features.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's config. Defaults to CLIP ViT-L/14 at 336 px, as `LlavaNextConfig`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's config. Defaults to Llama with a 32064-token vocabulary (llava-v1.6-*-hf).
        image_token_index (`int`, *optional*, defaults to 32000):
            The id of the `<image>` placeholder token; also accepted as `image_token_id`.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the projector's two linear layers.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token from each crop's features, `"full"` keeps every token.
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -2):
            Index (or indices, concatenated on the hidden axis) into the vision tower's hidden states.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have a bias.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Tie the language-model head to the input embeddings.
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            The `[height, width]` resolutions an image may be tiled to, each a multiple of `vision_config.image_size`.
            Defaults to `[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`.
        image_seq_length (`int`, *optional*, defaults to 576):
            Tokens of the base view (informational; the model derives every count from `llava_ext.anyres`).

    Example:

    ```python
    >>> from llava_ext import LlavaExtNextConfig, LlavaExtNextForConditionalGeneration
    >>> config = LlavaExtNextConfig(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]])
    >>> model = LlavaExtNextForConditionalGeneration(config)
    ```
    """

    model_type = "llava_ext_next"
    stock_model_type = LlavaNextConfig.model_type
    default_text_config = DEFAULT_TEXT_CONFIG  # llava-v1.6-*-hf: 32000 tokens + <image> + <pad>, padded to 32064

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **self.prepare_init_kwargs(args, kwargs))

    # The arguments are the stock ones, passed through: say so to `inspect.signature` (transformers' model testers
    # build configs from it, and so do tools that read a config class's arguments).
    __init__.__signature__ = inspect.signature(LlavaNextConfig.__init__)


__all__ = ["AnyresConfigMixin", "LlavaExtNextConfig"]
