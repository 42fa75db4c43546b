"""LlavaExt-OneVision: LLaVA-OneVision as transformers classes, state-dict and numerically equal to transformers'
`LlavaOnevisionForConditionalGeneration`.

LlavaExt-NeXT's anyres model with OneVision's three input kinds:

    single image  -> base view + unpadded tile map, shrunk bilinearly to <= N tiles' worth ("anyres_max_N") + newlines
    multi-image   -> each image's base view + one image_newline (batch_num_images > 1 for its sample)
    video         -> each frame's p x p features pooled 2x bilinearly to ceil(p/2)^2, frames concatenated + newline

Every count comes from `llava_ext.anyres` and is checked before the vision tower runs. This file is copied next to
checkpoints for `trust_remote_code`: it imports only torch, transformers' stable public names and its siblings.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin, LlavaOnevisionConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .anyres import anyres_max_shape, num_image_tokens_onevision, num_tiles, num_video_tokens_onevision
from .configuration_llava_ext_onevision import LlavaExtOnevisionConfig
from .modeling_llava_ext import (
    _can_return_tuple,
    _output_class,
    _pop_cache,
    auto_map_for,
    image_token_mismatch_error,
    scatter_features,
)
from .modeling_llava_ext_next import (
    NEXT_STOCK_KEY_MAPPING,
    LlavaExtNextForConditionalGeneration,
    LlavaExtNextModel,
    LlavaExtNextPreTrainedModel,
)
from .vision import num_image_features

ONEVISION_AUTO_MAP = auto_map_for(
    "configuration_llava_ext_onevision.LlavaExtOnevisionConfig",
    "modeling_llava_ext_onevision.LlavaExtOnevisionModel",
    "modeling_llava_ext_onevision.LlavaExtOnevisionForConditionalGeneration",
)

LlavaExtOnevisionModelOutputWithPast = _output_class(
    "LlavaExtOnevisionModelOutputWithPast",
    "Outputs of `LlavaExtOnevisionModel`: the fields of transformers' `LlavaOnevisionModelOutputWithPast`.",
    ["last_hidden_state"],
    media=("image", "video"),
)
LlavaExtOnevisionCausalLMOutputWithPast = _output_class(
    "LlavaExtOnevisionCausalLMOutputWithPast",
    "Outputs of `LlavaExtOnevisionForConditionalGeneration`: the fields of `LlavaOnevisionCausalLMOutputWithPast`.",
    ["loss", "logits"],
    media=("image", "video"),
)


def _video_pixels(pixel_values_videos: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """The frames given to `get_video_features`, under either name the reference has used: `pixel_values_videos`
    (5.2x), or `pixel_values` (5.17), popped from `kwargs`."""
    legacy = kwargs.pop("pixel_values", None)
    if pixel_values_videos is not None and legacy is not None:
        raise TypeError("get_video_features() got the frames twice: pass either pixel_values_videos or pixel_values.")
    if pixel_values_videos is None and legacy is None:
        raise TypeError(
            "get_video_features() needs the frames: pass pixel_values_videos of shape (num_videos, frames, channels, "
            "height, width), as the processor returns them."
        )
    return legacy if pixel_values_videos is None else pixel_values_videos


class LlavaExtOnevisionPreTrainedModel(LlavaExtNextPreTrainedModel):
    config_class = LlavaExtOnevisionConfig
    config: LlavaExtOnevisionConfig
    input_modalities = ("image", "video", "text")
    stock_config_class = LlavaOnevisionConfig
    stock_key_mapping = NEXT_STOCK_KEY_MAPPING  # transformers maps llava_onevision checkpoints as llava_next's
    auto_map_entries = ONEVISION_AUTO_MAP


class LlavaExtOnevisionModel(LlavaExtOnevisionPreTrainedModel, LlavaExtNextModel):
    """Vision tower + projector + `image_newline` + language model (no LM head), as `LlavaOnevisionModel`."""

    output_class = LlavaExtOnevisionModelOutputWithPast

    def _multi_image(self, image_sizes, batch_num_images) -> list[bool]:
        """Per image: whether its sample holds several images (then only its base view is used)."""
        if batch_num_images is None:  # as the reference: every image is a single image
            return [False] * len(image_sizes)
        return [int(n) != 1 for n in batch_num_images for _ in range(int(n))]

    def num_crops(self, image_sizes, batch_num_images=None, **image_kwargs) -> list[int]:
        tile, pinpoints = self.config.vision_config.image_size, self.config.image_grid_pinpoints
        multi = self._multi_image(image_sizes, batch_num_images)
        return [1 if many else num_tiles(size, pinpoints, tile) for size, many in zip(image_sizes, multi)]

    def num_image_tokens(
        self, image_sizes, vision_feature_select_strategy, batch_num_images=None, vision_aspect_ratio=None, **kwargs
    ):
        vision = self.config.vision_config
        per_crop = num_image_features(vision, vision.image_size, vision.image_size, "full")
        if per_crop is None:
            return None
        geometry = {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "grid_pinpoints": self.config.image_grid_pinpoints,
            "vision_feature_select_strategy": vision_feature_select_strategy,
            "vision_aspect_ratio": vision_aspect_ratio or self.config.vision_aspect_ratio,
            "num_additional_image_tokens": per_crop - (vision.image_size // vision.patch_size) ** 2,
        }
        sizes = torch.as_tensor(image_sizes).tolist()
        multi = self._multi_image(sizes, batch_num_images)
        return [num_image_tokens_onevision(*size, multi_image=many, **geometry) for size, many in zip(sizes, multi)]

    def _resize_feature_map(self, feature_map, side, vision_aspect_ratio=None, **image_kwargs) -> torch.Tensor:
        """A map above N tiles' worth ("anyres_max_N") shrunk bilinearly, to the sizes `llava_ext.anyres` counts."""
        height, width = feature_map.shape[1:]
        aspect_ratio = vision_aspect_ratio or self.config.vision_aspect_ratio
        target = anyres_max_shape(height, width, side, aspect_ratio)
        if target == (height, width):
            return feature_map
        return nn.functional.interpolate(feature_map[None], list(target), mode="bilinear")[0]  # (hidden, h, w)

    def apply_pooling(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(frames, p*p, hidden)` -> `(frames, ceil(p/2)^2, hidden)`, bilinear, as the reference."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        frames, _, hidden = image_features.shape
        feature_map = image_features.view(frames, side, side, -1).permute(0, 3, 1, 2)  # (frames, hidden, p, p)
        pooled = nn.functional.interpolate(feature_map, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(frames, -1, hidden)  # (frames, ceil(p/2)^2, hidden)

    @_can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Pooled video features: `pooler_output` `(num_videos, frames * ceil(p/2)^2 + 1, text_hidden)`, the last
        token each video's `image_newline`, as the reference (5.24).

        Args:
            pixel_values_videos (`torch.Tensor` of shape `(num_videos, frames, channels, height, width)`): the frames;
                also accepted as `pixel_values=`, the reference's name for it up to 5.2x.
        """
        pixel_values_videos = _video_pixels(pixel_values_videos, kwargs)
        batch, frames, channels, height, width = pixel_values_videos.shape
        frames_flat = pixel_values_videos.view(batch * frames, channels, height, width)
        features, output = self._encode_images(
            frames_flat, vision_feature_layer, vision_feature_select_strategy, output_hidden_states, output_attentions,
            **kwargs,
        )
        features = self.apply_pooling(features).reshape(batch, -1, features.shape[-1])  # (videos, frames*q*q, hidden)
        newline = self.image_newline[None, None, :].repeat(batch, 1, 1).to(features.device)  # (videos, 1, hidden)
        output.pooler_output = torch.cat((features, newline), dim=1)
        return output

    def _merge_videos(self, input_ids, inputs_embeds, pixel_values_videos, vision_feature_layer, strategy):
        """The videos' features in the `<video>` positions, the count checked before the vision tower runs."""
        vision = self.config.vision_config
        mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.video_token_id)  # (batch, seq)
        num_videos, frames = pixel_values_videos.shape[:2]
        per_video = num_video_tokens_onevision(frames, image_size=vision.image_size, patch_size=vision.patch_size)
        checked = not torch.compiler.is_compiling()
        if checked and int(mask.sum()) != num_videos * per_video:
            raise image_token_mismatch_error(
                int(mask.sum()),
                [per_video] * num_videos,
                f"{num_videos} video(s) of {frames} frames give {num_videos * per_video} features ({per_video} each)",
                strategy,
                modality="video",
            )
        video_outputs = self.get_video_features(
            pixel_values_videos, vision_feature_layer, strategy, return_dict=True
        )
        features = video_outputs.pooler_output.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
        return scatter_features(inputs_embeds, mask, features, checked, "video"), (video_outputs, features)

    @_can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        **kwargs,
    ):
        """Same arguments (in the same order) and outputs as transformers' `LlavaOnevisionModel.forward`;
        `image_sizes_videos` is accepted and unused, as there."""
        cache = _pop_cache(cache, kwargs)
        inputs_embeds = self._embed_inputs(input_ids, inputs_embeds)
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        media = {}
        if pixel_values is not None:
            inputs_embeds, media["image"] = self._merge_images(
                input_ids,
                inputs_embeds,
                pixel_values,
                strategy,
                vision_feature_layer=vision_feature_layer,
                image_sizes=image_sizes,
                batch_num_images=batch_num_images,
                vision_aspect_ratio=vision_aspect_ratio,
            )
        if pixel_values_videos is not None:
            inputs_embeds, media["video"] = self._merge_videos(
                input_ids, inputs_embeds, pixel_values_videos, vision_feature_layer, strategy
            )
        return self._run_language_model(inputs_embeds, attention_mask, position_ids, cache, media, **kwargs)


class LlavaExtOnevisionForConditionalGeneration(
    LlavaExtOnevisionPreTrainedModel, LlavaExtNextForConditionalGeneration, GenerationMixin
):
    """LLaVA-OneVision with a language-model head; same forward signature and outputs as
    `LlavaOnevisionForConditionalGeneration`."""

    base_model_class = LlavaExtOnevisionModel
    output_class = LlavaExtOnevisionCausalLMOutputWithPast

    def get_video_features(
        self, pixel_values_videos=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        """See `LlavaExtOnevisionModel.get_video_features`."""
        return self.model.get_video_features(
            _video_pixels(pixel_values_videos, kwargs), vision_feature_layer, vision_feature_select_strategy, **kwargs
        )

    @_can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """Same arguments (in the same order) and outputs as `LlavaOnevisionForConditionalGeneration.forward`."""
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            pixel_values_videos=pixel_values_videos,
            image_sizes_videos=image_sizes_videos,
            vision_aspect_ratio=vision_aspect_ratio,
            batch_num_images=batch_num_images,
            return_dict=True,
            **kwargs,
        )


__all__ = [
    "ONEVISION_AUTO_MAP",
    "LlavaExtOnevisionCausalLMOutputWithPast",
    "LlavaExtOnevisionForConditionalGeneration",
    "LlavaExtOnevisionModel",
    "LlavaExtOnevisionModelOutputWithPast",
    "LlavaExtOnevisionPreTrainedModel",
]
