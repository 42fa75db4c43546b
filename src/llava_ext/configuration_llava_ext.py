"""LlavaExt model configuration.

`LlavaExtConfig` is transformers' `LlavaConfig` with its own `model_type`, a default text config whose vocabulary holds
the image token, and checks that turn a bad combination into a `ValueError` at construction instead of a shape error
deep inside `forward`. Every `LlavaConfig` argument keeps its meaning, so `LlavaExtConfig(**LlavaConfig().to_dict())`
works. This file is copied next to checkpoints for `trust_remote_code`: it imports only transformers.
"""

from transformers import LlavaConfig

VISION_FEATURE_SELECT_STRATEGIES = ("default", "full")
# llava-hf/llava-1.5-7b-hf: Llama's 32000 tokens + <image> + <pad>, padded to a multiple of 64.
DEFAULT_TEXT_CONFIG = {"model_type": "llama", "vocab_size": 32064}


def check_vision_feature_select_strategy(strategy) -> None:
    """Raise a ValueError naming the choices; run before the dataclass' own type check, whose message does not."""
    if strategy not in VISION_FEATURE_SELECT_STRATEGIES:
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} is not supported; use 'default' (drop the CLS token, "
            "as CLIP-based LLaVA-1.5) or 'full' (keep every token, as SigLIP towers without CLS)."
        )


class LlavaExtConfigMixin:
    """What every llava_ext config adds to its stock transformers twin (`stock_model_type`): a stock config dict
    reads as ours, and `__post_init__` checks the vision layers and the placeholder tokens against the sub-configs.

    transformers makes each config subclass a dataclass with a generated `__init__` unless the class defines one
    itself, so each config keeps its own small `__init__` (calling `prepare_init_kwargs`)."""

    stock_model_type: str
    default_text_config: dict | None = None  # used when no text_config is given; None keeps the stock default
    placeholder_tokens: tuple[tuple[str, str], ...] = (("image_token_index", "'<image>'"),)

    @classmethod
    def prepare_init_kwargs(cls, args: tuple, kwargs: dict) -> dict:
        """`kwargs` for the stock `__init__`: the class decides `model_type`, the default text config is ours."""
        # A dict from the stock config's `to_dict()` carries the stock model_type: the class decides the type.
        kwargs.pop("model_type", None)
        if cls.default_text_config is not None and len(args) < 2 and kwargs.get("text_config") is None:
            kwargs["text_config"] = dict(cls.default_text_config)
        check_vision_feature_select_strategy(kwargs.get("vision_feature_select_strategy", "default"))
        return kwargs

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As `PreTrainedConfig.get_config_dict`; a stock config of our twin (same fields, same meaning) reads as ours."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == cls.stock_model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_vision_feature_layer()
        self._validate_placeholder_tokens()

    def _validate_vision_feature_layer(self):
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        num_states = getattr(self.vision_config, "num_hidden_layers", None)
        if not layers:
            raise ValueError("vision_feature_layer=[] selects no vision features; give an int or a non-empty list.")
        if num_states is None:  # a vision model without a layer count: nothing to check against
            return
        low, high = -(num_states + 1), num_states
        bad = [layer for layer in layers if not low <= layer <= high]
        if bad:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} has {bad} outside the vision tower's hidden states: "
                f"with {num_states} layers the allowed indices are {low}..{high} (0 is the embedding output, "
                "-1 the last layer)."
            )

    def _validate_placeholder_tokens(self):
        vocab_size = getattr(self.text_config, "vocab_size", None)
        for field, token in self.placeholder_tokens:
            token_id = getattr(self, field)
            if vocab_size is not None and not 0 <= token_id < vocab_size:
                convert = ", or convert an original LLaVA checkpoint (image id -200) with `llava-ext convert`"
                raise ValueError(
                    f"{field}={token_id} is outside the text vocabulary (0..{vocab_size - 1}); add {token} to the "
                    f"tokenizer, resize the embeddings and pass its id{convert if field == 'image_token_index' else ''}."
                )


class LlavaExtConfig(LlavaExtConfigMixin, LlavaConfig):
    r"""
    Configuration of a LLaVA model: a vision tower (`vision_config`, any registered vision model; CLIP and SigLIP run
    with llava_ext's own layer-skipping tower), a two-layer MLP projector and a causal language model (`text_config`).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's config. Defaults to CLIP ViT-L/14 at 336 px, as `LlavaConfig`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's config. Defaults to Llama with a 32064-token vocabulary (llava-1.5-7b-hf).
        image_token_index (`int`, *optional*, defaults to 32000):
            The id of the `<image>` placeholder token; also accepted as `image_token_id`.
        image_seq_length (`int`, *optional*, defaults to 576):
            Number of placeholder tokens one image expands to (informational; the model derives the real count).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the projector's two linear layers.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token from the selected vision features, `"full"` keeps every token.
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -2):
            Index (or indices, concatenated on the hidden axis) into the vision tower's hidden states; 0 is the
            embedding output, -1 the last layer.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have a bias.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Tie the language-model head to the input embeddings.

    Example:

    ```python
    >>> from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
    >>> config = LlavaExtConfig(vision_feature_layer=[-3, -1])
    >>> model = LlavaExtForConditionalGeneration(config)
    ```
    """

    model_type = "llava_ext"
    stock_model_type = LlavaConfig.model_type
    default_text_config = DEFAULT_TEXT_CONFIG

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **self.prepare_init_kwargs(args, kwargs))


__all__ = ["LlavaExtConfig", "LlavaExtConfigMixin", "check_vision_feature_select_strategy"]
