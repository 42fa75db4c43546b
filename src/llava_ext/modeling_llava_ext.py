"""LlavaExt: LLaVA as transformers classes, state-dict and numerically equal to transformers' `LlavaForConditionalGeneration`.

What differs from the reference:
- the vision tower runs only the layers `vision_feature_layer` reads (`vision_feature_layer=0` works);
- the number of `<image>` tokens is checked against what the images will produce *before* the vision tower runs, and
  a mismatch names both numbers and the likely cause;
- any causal-LM backbone (`AutoModel.from_config(text_config)`), any number of images per sample.

Data flow of one forward:

    input_ids ---------------> embed_tokens ---> inputs_embeds (batch, seq, text_hidden)
    pixel_values -> vision_tower -> selected states -> projector --+  masked_scatter into the <image> positions
                                                                    v
                                         language_model -> lm_head -> logits

This file is copied next to checkpoints for `trust_remote_code` and runs on transformers releases we have never seen:
it imports only torch, the standard library, its siblings and transformers' stable public names (the top-level package
and `transformers.modeling_outputs`), defines its own output classes, and detects API differences between releases by
feature (`CACHE_NAME`, `IMAGE_OUTPUTS`, the language model's signature), never by version string.
"""

import dataclasses
import functools
import inspect
from typing import Any

import torch
import transformers.modeling_outputs as modeling_outputs
from torch import nn
from transformers import AutoModel, GenerationMixin, LlavaConfig, PreTrainedModel, logging
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput

from .configuration_llava_ext import LlavaExtConfig
from .vision import build_vision_tower, num_image_features

logger = logging.get_logger(__name__)

# Conventions of the installed transformers, detected by feature (never by version string), so that code written
# against transformers' own LLaVA reads our outputs the same way on every release:
# - 5.24 renamed the KV cache `past_key_values` -> `cache` in forward arguments and outputs (old name deprecated).
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
# - 5.24 returns the vision encoder's whole output as `image_outputs`; `image_hidden_states` became a deprecated
#   property giving `image_outputs.pooler_output`. Before, `image_hidden_states` was a field holding the features.
IMAGE_OUTPUTS = hasattr(modeling_outputs, "MultimodalBaseModelOutputWithPast")

# The key layouts of llava checkpoints: 4.x names, which 5.x's save_pretrained keeps, and llava-hf's on the Hub (CLIP
# under `vision_tower.vision_model.`). Read through `from_pretrained`'s public `key_mapping`, so the checkpoint's own
# code needs no conversion internals; written back the same way on save. transformers reverses these patterns for
# saving by dropping the `^`: keep them plain (no escapes), as its own mappings are.
STOCK_KEY_MAPPING = {
    "^language_model.lm_head": "lm_head",
    "^language_model.model": "model.language_model",
    "^vision_tower.vision_model": "model.vision_tower",
    "^vision_tower": "model.vision_tower",
    "^multi_modal_projector": "model.multi_modal_projector",
}

# projector_hidden_act -> module, for the activations LLaVA checkpoints use (transformers' ACT2FN is not public API)
PROJECTOR_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": lambda: _QuickGELU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
    "relu": lambda: nn.ReLU(),
    "tanh": lambda: nn.Tanh(),
    "linear": lambda: nn.Identity(),
}


class ImageTokenMismatchError(ValueError, RuntimeError):
    """The `<image>` placeholders cannot hold the images' features.

    A ValueError (bad user input); also a RuntimeError, which transformers' own LLaVA tests expect from this check.
    """


def image_token_mismatch_error(
    num_tokens: int,
    per_item: list[int],
    features: str,
    vision_feature_select_strategy: str,
    modality: str = "image",
    anyres: bool = False,
) -> ImageTokenMismatchError:
    """The error for `num_tokens` placeholders where the items (images or videos) give `per_item` features each.

    `features` says in words what gives how many features; the likely cause is read off the two counts: no
    placeholder; one token off per item (CLS / strategy, USERS.md #1b); fewer (truncation, or for `anyres` a processor
    that counts tiles differently, #1c); more (more placeholders than items).
    """
    placeholder, num_items, total = f"'<{modality}>'", len(per_item), sum(per_item)
    if num_tokens == 0:
        cause = f"the text has no {placeholder} placeholder: put one {placeholder} per {modality} in the prompt"
    elif abs(num_tokens - total) == num_items:
        cause = (
            f"the processor expands each {placeholder} one token off the model: set the processor's "
            "num_additional_image_tokens (1 for CLIP's CLS token, 0 for SigLIP) and vision_feature_select_strategy "
            f"('{vision_feature_select_strategy}') to match the model"
        )
    elif num_tokens < total:
        cause = (
            "some placeholders were cut off, most often by truncation or max_length: raise max_length or pass "
            "truncation=False"
        )
        if anyres:
            cause += (
                "; or the processor counted the anyres tiles differently: give it the model's image_grid_pinpoints, "
                "patch size and vision_aspect_ratio and pass the images' original `image_sizes` (llava_ext's "
                "processors count with llava_ext.anyres, as the model does)"
            )
    else:
        cause = f"there are more placeholders than {modality}s: give one {modality} per {placeholder} in the text"
    return ImageTokenMismatchError(
        f"{modality.capitalize()} features and {modality} tokens do not match: the text has {num_tokens} {modality} "
        f"tokens, but {features}. Likely cause: {cause}."
    )


class _QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's original activation."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * torch.sigmoid(1.702 * hidden_states)


class LlavaExtMultiModalProjector(nn.Module):
    """`linear_1` -> act -> `linear_2`; input width = vision hidden size x number of selected vision layers."""

    def __init__(self, config: LlavaExtConfig):
        super().__init__()
        if config.projector_hidden_act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"projector_hidden_act={config.projector_hidden_act!r} is not supported; use one of "
                f"{', '.join(sorted(PROJECTOR_ACTIVATIONS))}."
            )
        num_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        text_hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_feature_layers, text_hidden, bias=bias)
        self.act = PROJECTOR_ACTIVATIONS[config.projector_hidden_act]()
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def _deprecated_hidden_states(media: str) -> property:
    """`image_hidden_states` (or `video_...`) as a deprecated property giving `<media>_outputs.pooler_output`."""

    def getter(self):
        logger.warning_once(
            f"`{media}_hidden_states` is deprecated (as in transformers' LLaVA); use `out.{media}_outputs.pooler_output`."
        )
        outputs = getattr(self, f"{media}_outputs")
        return outputs.pooler_output if outputs is not None else None

    return property(getter)


def _to_tuple_with_encoder_outputs(self) -> tuple:
    # as transformers' MultimodalModelOutput: the nested encoder outputs become tuples too
    return tuple(self[key].to_tuple() if key.endswith("_outputs") else self[key] for key in self.keys())


def _output_class(name: str, doc: str, leading_fields: list[str], media: tuple[str, ...] = ("image",)) -> type:
    """Our own `ModelOutput` dataclass with the installed transformers' field names for LLaVA outputs, with one
    encoder-output field per `media` ("image", "video")."""
    names = [*leading_fields, CACHE_NAME, "hidden_states", "attentions"]
    media_fields = tuple(f"{kind}_outputs" if IMAGE_OUTPUTS else f"{kind}_hidden_states" for kind in media)
    names += media_fields
    # media_fields: a plain class attribute (not a field), read while compiling, where dataclasses.fields() is not
    namespace = {"__module__": __name__, "__doc__": doc, "media_fields": media_fields}
    if IMAGE_OUTPUTS:
        namespace.update({f"{kind}_hidden_states": _deprecated_hidden_states(kind) for kind in media})
        namespace["to_tuple"] = _to_tuple_with_encoder_outputs
    fields = [(field, Any, dataclasses.field(default=None)) for field in names]
    return dataclasses.make_dataclass(name, fields, bases=(ModelOutput,), namespace=namespace)


LlavaExtModelOutputWithPast = _output_class(
    "LlavaExtModelOutputWithPast",
    "Outputs of `LlavaExtModel`: the fields of transformers' `LlavaModelOutputWithPast` in the installed release.",
    ["last_hidden_state"],
)
LlavaExtCausalLMOutputWithPast = _output_class(
    "LlavaExtCausalLMOutputWithPast",
    "Outputs of `LlavaExtForConditionalGeneration`: the fields of transformers' `LlavaCausalLMOutputWithPast`.",
    ["loss", "logits"],
)


def _can_return_tuple(forward):
    """`return_dict=False` (argument, else config) turns the output into a tuple, as transformers' models do."""

    @functools.wraps(forward)
    def wrapper(self, *args, return_dict: bool | None = None, **kwargs):
        output = forward(self, *args, **kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    return wrapper


def _pop_cache(cache, kwargs: dict):
    """The KV cache passed as `cache` (transformers >= 5.24) or `past_key_values` (before); not both."""
    past_key_values = kwargs.pop("past_key_values", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("Both `cache` and `past_key_values` were given; pass the KV cache once, as `cache`.")
    return cache if cache is not None else past_key_values


# Written into every saved config, so each Auto class resolves to our code where llava_ext is not installed.
# AutoModelForMultimodalLM where the release has it.
GENERATION_AUTO_CLASSES = (
    "AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModelForMultimodalLM", "AutoModelForPreTraining"
)


def auto_map_for(config: str, model: str, generation: str) -> dict[str, str]:
    """The `auto_map` of a llava_ext family: `"module.Class"` of its config, base model and generation model."""
    return {"AutoConfig": config, "AutoModel": model, **dict.fromkeys(GENERATION_AUTO_CLASSES, generation)}


AUTO_MAP = auto_map_for(
    "configuration_llava_ext.LlavaExtConfig",
    "modeling_llava_ext.LlavaExtModel",
    "modeling_llava_ext.LlavaExtForConditionalGeneration",
)


def compiled_for(compiled, owner) -> bool:
    """Whether `compiled`, a `torch.compile`d bound method, is bound to `owner`; `True` where torch does not say whom
    it is bound to (a wrapper of another kind), so that nothing is recompiled for want of an answer.

    `copy.deepcopy` copies functions as they are, so a deep copy of a model holds the original's compiled methods,
    still bound to the original: called on the copy they run the original, with its weights.
    """
    return getattr(getattr(compiled, "_torchdynamo_orig_callable", None), "__self__", owner) is owner


def drop_foreign_compiled_call(model) -> bool:
    """Forget a compiled `__call__` that `model` holds but that belongs to another model; returns whether it did.

    `generate()` keeps its compiled forward on the model (`_compiled_call`, made by `get_compiled_call`), bound to
    that model. A deep copy of a model that has decoded compiled would decode with the original's weights (frozen into
    the compiled step on CPU, read through the original otherwise) and answer as the original.
    """
    compiled = model.__dict__.get("_compiled_call")
    if compiled is None or compiled_for(compiled, model):
        return False
    del model.__dict__["_compiled_call"]
    model.__dict__.pop("_last_compile_config", None)
    return True


class LlavaExtPreTrainedModel(PreTrainedModel):
    config_class = LlavaExtConfig
    config: LlavaExtConfig
    stock_config_class = LlavaConfig  # the transformers config of our stock twin, accepted and turned into ours
    stock_key_mapping = STOCK_KEY_MAPPING  # the twin's checkpoint layouts, read by from_pretrained
    auto_map_entries = AUTO_MAP  # written into saved configs' auto_map
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the KV cache, under either release's name

    _supports_flash_attn = True
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LlavaExtConfig, *inputs, **kwargs):
        if type(config) is self.stock_config_class:  # same fields; our model_type picks our key layout on save
            stock = config
            config = self.config_class(**stock.to_dict())
            config.vision_config, config.text_config = stock.vision_config, stock.text_config
            if hasattr(stock, "_attn_implementation_internal"):  # the attention a user asked for
                config._attn_implementation_internal = stock._attn_implementation_internal
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; also reads the stock llava key layout, which `save_pretrained` writes."""
        if kwargs.get("key_mapping") is None:
            kwargs["key_mapping"] = cls._key_mapping()
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def _key_mapping(cls) -> dict[str, str]:
        """`stock_key_mapping` for a model with a head; for a base model (no `model.` prefix: `LlavaExtModel`), the
        same renames onto its own names, as transformers maps `LlavaModel`. transformers saves a loaded model by
        reversing the renames that matched, so each must name the loading class's keys: otherwise a base model read
        from a checkpoint saves other key names than the same model made from its config."""
        if getattr(cls, "base_model_class", None) is not None:
            return cls.stock_key_mapping
        prefix = f"{cls.base_model_prefix}."
        return {
            source: target.removeprefix(prefix)
            for source, target in cls.stock_key_mapping.items()
            if target.startswith(prefix) and source.removeprefix("^") != target.removeprefix(prefix)
        }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with an `auto_map` naming every Auto class when the code is saved too.

        FSDP2's `fully_shard` swaps the model's class for one it makes (`FSDPLlavaExt...`, defined in torch): saving
        runs as our class, or transformers (5.24) would copy torch's FSDP files as the model's code and name that class.
        """
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self.auto_map_entries}
        # only a model fully_shard has touched can be one, and then torch.distributed.fsdp is imported (torch >= 2.6)
        fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
        if fsdp_module is None or not isinstance(self, fsdp_module):
            return super().save_pretrained(save_directory, *args, **kwargs)
        sharded_class = type(self)
        self.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, fsdp_module))
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class


def scatter_features(
    inputs_embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, checked: bool, modality: str
) -> torch.Tensor:
    """`features` `(num_tokens, text_hidden)` written into the `mask`ed `(batch, seq)` positions of `inputs_embeds`.

    A count that could not be checked before the encoder ran (`checked=False`: a tower of unknown token layout) is
    checked here, outside compilation.
    """
    num_tokens = int(mask.sum()) if not checked and not torch.compiler.is_compiling() else None
    if num_tokens is not None and num_tokens != len(features):
        raise ImageTokenMismatchError(
            f"{modality.capitalize()} features and {modality} tokens do not match: the text has {num_tokens} "
            f"{modality} tokens, the vision tower gave {features.shape[0]} features."
        )
    mask = mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
    return inputs_embeds.masked_scatter(mask, features)  # (batch, seq, text_hidden)


class LlavaExtModel(LlavaExtPreTrainedModel):
    """Vision tower + projector + language model (no LM head); returns `LlavaExtModelOutputWithPast`."""

    output_class = LlavaExtModelOutputWithPast

    def __init__(self, config: LlavaExtConfig):
        super().__init__(config)
        self._build_submodules(self.config)  # a stock config was turned into ours
        # the language model's name for its KV-cache argument in the installed release (a custom backbone may differ)
        lm_arguments = inspect.signature(self.language_model.forward).parameters
        self._lm_cache_name = "cache" if "cache" in lm_arguments else "past_key_values"
        self.post_init()

    def _build_submodules(self, config: LlavaExtConfig):
        """The modules, named as the checkpoint keys; subclasses add theirs (NeXT's `image_newline`)."""
        self.vision_tower = build_vision_tower(config.vision_config)
        self.multi_modal_projector = LlavaExtMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def _run_vision_tower(
        self, pixel_values, layers, output_hidden_states, output_attentions, **kwargs
    ) -> tuple[list[torch.Tensor], BaseModelOutputWithPooling]:
        """Hidden states at `layers`, and what the tower returns besides: the requested layers only, unless the caller
        asked for every hidden state or the attentions (then the whole tower runs, as the reference's)."""
        if hasattr(self.vision_tower, "select_hidden_states") and not (output_hidden_states or output_attentions):
            states = self.vision_tower.select_hidden_states(pixel_values, layers, **kwargs)
            return states, BaseModelOutputWithPooling()
        outputs = self.vision_tower(
            pixel_values, output_hidden_states=True, output_attentions=output_attentions, return_dict=True, **kwargs
        )
        states = [outputs.hidden_states[layer] for layer in layers]
        tower_output = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=getattr(outputs, "pooler_output", None),  # replaced by the projected features; keeps order
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions if output_attentions else None,
        )
        return states, tower_output

    @_can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Projected image features, with the vision tower's hidden states and attentions when asked for.

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`): the images.
            vision_feature_layer (`int` or `list[int]`, *optional*): overrides `config.vision_feature_layer`.
            vision_feature_select_strategy (`str`, *optional*): overrides `config.vision_feature_select_strategy`.
            image_sizes (`torch.Tensor` of shape `(num_images, 2)`, *optional*): for towers taking variable sizes.
            output_hidden_states (`bool`, *optional*): also return every hidden state of the vision tower (the whole
                tower then runs, as the reference's does).
            output_attentions (`bool`, *optional*): also return the vision tower's attentions (needs an attention
                implementation that returns them, e.g. `"eager"`).
            return_dict (`bool`, *optional*): `False` returns the output as a tuple; defaults to `config.return_dict`.

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` is a list with one `(num_features, text_hidden)` tensor per
            image (as the reference). When the whole tower ran (hidden states or attentions asked for),
            `last_hidden_state`, `hidden_states` and `attentions` are the tower's, as the reference's; otherwise only
            the layers `vision_feature_layer` reads ran, and `last_hidden_state` holds the selected (unprojected)
            states `(num_images, num_features, vision_hidden * num_layers)`.
        """
        if image_sizes is not None and not hasattr(self.vision_tower, "select_hidden_states"):
            kwargs["image_sizes"] = image_sizes  # only variable-size towers (e.g. Pixtral) take it
        image_features, output = self._encode_images(
            pixel_values, vision_feature_layer, vision_feature_select_strategy, output_hidden_states, output_attentions,
            **kwargs,
        )
        if "image_sizes" in kwargs:
            split_sizes = (torch.as_tensor(image_sizes) // self.vision_tower.patch_size).prod(dim=-1).tolist()
            image_features = list(torch.split(image_features.squeeze(0), split_sizes))
        else:
            image_features = list(image_features)
        output.pooler_output = image_features
        return output

    def _encode_images(
        self, pixel_values, vision_feature_layer, vision_feature_select_strategy, output_hidden_states,
        output_attentions, **kwargs,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        """Projected features `(num_images, num_features, text_hidden)` of a batch of same-size crops, and the tower's
        output (`last_hidden_state` the selected states where only the read layers ran); see `get_image_features`."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        layers = [layer] if isinstance(layer, int) else list(layer)
        # Unset, they follow the tower's config (`config.vision_config.output_hidden_states`, as the reference's tower
        # does). transformers >= 5.24 may pass the wanted layer indices here; only True asks for every state.
        vision = self.config.vision_config
        if output_hidden_states is None:
            output_hidden_states = getattr(vision, "output_hidden_states", False)
        if output_attentions is None:
            output_attentions = getattr(vision, "output_attentions", False)
        output_hidden_states = output_hidden_states is True
        states, output = self._run_vision_tower(pixel_values, layers, output_hidden_states, output_attentions, **kwargs)
        if strategy == "default":
            states = [state[:, 1:] for state in states]  # (num_images, num_patches, vision_hidden)
        selected = torch.cat(states, dim=-1)  # (num_images, num_features, vision_hidden * len(layers))
        if output.last_hidden_state is None:
            output.last_hidden_state = selected
        return self.multi_modal_projector(selected), output  # (num_images, num_features, text_hidden)

    def get_placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, token_id: int | None = None
    ) -> torch.Tensor:
        """Boolean `(batch, seq)` mask of the placeholder positions of `token_id` (default: the image token), from the
        ids or, failing those, the embeddings."""
        token_id = self.config.image_token_id if token_id is None else token_id
        if input_ids is not None:
            return input_ids == token_id
        embedding = self.get_input_embeddings()(torch.tensor(token_id, dtype=torch.long, device=inputs_embeds.device))
        return (inputs_embeds == embedding).all(-1)

    def check_image_token_count(
        self,
        special_image_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        vision_feature_select_strategy: str,
        **image_kwargs,
    ) -> bool:
        """Raise a ValueError naming both counts if the placeholders cannot hold the images' features.

        `image_kwargs` are those `get_image_features` gets (unused here; the anyres models read `image_sizes`).
        Returns whether the count was checked: False for towers of unknown token layout, and while compiling.
        """
        height, width = pixel_values.shape[-2:]
        per_image = num_image_features(self.config.vision_config, height, width, vision_feature_select_strategy)
        if per_image is None or torch.compiler.is_compiling():
            return False
        num_images = pixel_values.shape[0]
        num_tokens = int(special_image_mask.sum())
        if num_tokens == num_images * per_image:
            return True
        raise image_token_mismatch_error(
            num_tokens,
            [per_image] * num_images,
            f"{num_images} image(s) of {height}x{width} give {num_images * per_image} features ({per_image} each with "
            f"patch size {self.config.vision_config.patch_size}, strategy '{vision_feature_select_strategy}')",
            vision_feature_select_strategy,
        )

    @_can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> LlavaExtModelOutputWithPast:
        """Same arguments and outputs as transformers' `LlavaModel.forward` in the installed release; the KV cache is
        accepted as `cache` or `past_key_values`."""
        cache = _pop_cache(cache, kwargs)
        inputs_embeds = self._embed_inputs(input_ids, inputs_embeds)
        media = {}
        if pixel_values is not None:
            inputs_embeds, media["image"] = self._merge_images(
                input_ids,
                inputs_embeds,
                pixel_values,
                vision_feature_select_strategy,
                vision_feature_layer=vision_feature_layer,
                image_sizes=image_sizes,
            )
        return self._run_language_model(inputs_embeds, attention_mask, position_ids, cache, media, **kwargs)

    def _embed_inputs(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (batch, seq, text_hidden)
        return inputs_embeds

    def _merge_images(
        self, input_ids, inputs_embeds, pixel_values, vision_feature_select_strategy, **image_kwargs
    ) -> tuple[torch.Tensor, tuple[BaseModelOutputWithPooling, torch.Tensor]]:
        """The images' features in the `<image>` positions, their count checked before the vision tower runs.

        Returns the new `inputs_embeds` and `(image_outputs, image_features)`; `image_kwargs` go to
        `check_image_token_count` and `get_image_features`.
        """
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        special_image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)  # (batch, seq)
        checked = self.check_image_token_count(special_image_mask, pixel_values, strategy, **image_kwargs)
        image_outputs = self.get_image_features(
            pixel_values, vision_feature_select_strategy=strategy, return_dict=True, **image_kwargs
        )
        # (total_image_tokens, text_hidden)
        image_features = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = scatter_features(inputs_embeds, special_image_mask, image_features, checked, "image")
        return inputs_embeds, (image_outputs, image_features)

    def _run_language_model(
        self, inputs_embeds, attention_mask, position_ids, cache, media: dict[str, tuple], **kwargs
    ) -> LlavaExtModelOutputWithPast:
        """The language model over the merged embeddings; `media` maps "image"/"video" to (encoder outputs,
        features), reported in the installed release's fields (`image_outputs`, or `image_hidden_states` before)."""
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **{self._lm_cache_name: cache},
            **kwargs,
        )
        media_fields = {}
        for field in self.output_class.media_fields:
            kind, _, kept = field.partition("_")  # "image_outputs" -> ("image", "outputs")
            encoder_outputs, features = media.get(kind, (None, None))
            media_fields[field] = encoder_outputs if kept == "outputs" else features
        return self.output_class(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME, None)},
            **media_fields,
        )


class LlavaExtForConditionalGeneration(LlavaExtPreTrainedModel, GenerationMixin):
    """LLaVA with a language-model head; same forward signature and outputs as `LlavaForConditionalGeneration`.

    `generate()` is transformers' own: `pixel_values` reach the model on the prefill step only.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    base_model_class = LlavaExtModel
    output_class = LlavaExtCausalLMOutputWithPast

    def __init__(self, config: LlavaExtConfig):
        super().__init__(config)
        config = self.config  # a stock LlavaConfig was turned into ours
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_compiled_call(self, compile_config):
        """transformers' compiled forward for `generate()`, made anew on a deep copy (see `drop_foreign_compiled_call`):
        a copy of a model that had decoded compiled would otherwise decode with the original's weights."""
        drop_foreign_compiled_call(self)
        return super().get_compiled_call(compile_config)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """See `LlavaExtModel.get_image_features`."""
        return self.model.get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    @_can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> LlavaExtCausalLMOutputWithPast:
        """Same arguments and outputs as `LlavaForConditionalGeneration.forward` in the installed release
        (`cache_position` and other backbone arguments pass through `**kwargs`; the KV cache is accepted as `cache` or
        `past_key_values`); `labels` of -100 are ignored by the loss."""
        cache = _pop_cache(cache, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (batch, kept_seq, vocab)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return self.output_class(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            **{field: getattr(outputs, field) for field in self.output_class.media_fields},
        )


__all__ = [
    "AUTO_MAP",
    "STOCK_KEY_MAPPING",
    "ImageTokenMismatchError",
    "LlavaExtCausalLMOutputWithPast",
    "LlavaExtForConditionalGeneration",
    "LlavaExtModel",
    "LlavaExtModelOutputWithPast",
    "LlavaExtMultiModalProjector",
    "LlavaExtPreTrainedModel",
    "compiled_for",
    "auto_map_for",
    "drop_foreign_compiled_call",
    "image_token_mismatch_error",
    "scatter_features",
]
