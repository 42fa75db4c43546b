"""LlavaExt-NeXT: LLaVA-NeXT (1.6) "anyres" as transformers classes, state-dict and numerically equal to transformers'
`LlavaNextForConditionalGeneration`.

LLaVA-1.5's model (`LlavaExtModel`: the layer-skipping tower, the projector, any causal LM, the token-count check
before the tower runs) with anyres images. Each image arrives as crops, its base view first, then its tiles:

    pixel_values (num_images, max_crops, C, H, W) --crops of each image--> (total_crops, C, H, W) -> tower -> projector
    per image: base (p*p, hidden)   tiles (rows*cols, p*p, hidden) -> one (hidden, rows*p, cols*p) map -> unpad
               -> + image_newline at the end of every row -> flatten -> [base ; map rows]   (the image's tokens)

`image_sizes` (the images' original `(height, width)`) fixes the tile grid and the unpadding, and so each image's
token count; `llava_ext.anyres` computes it for the processor and for the model's check alike.

This file is copied next to checkpoints for `trust_remote_code`: it imports only torch, transformers' stable public
names and its siblings.
"""

import torch
from torch import nn
from transformers import GenerationMixin, LlavaNextConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .anyres import image_grid_shape, num_image_tokens_next, num_tiles, unpad_image
from .configuration_llava_ext_next import LlavaExtNextConfig
from .modeling_llava_ext import (
    STOCK_KEY_MAPPING,
    LlavaExtForConditionalGeneration,
    LlavaExtModel,
    LlavaExtPreTrainedModel,
    _can_return_tuple,
    auto_map_for,
    image_token_mismatch_error,
)
from .vision import num_image_features

# llava_next checkpoints: llava's layouts plus the top-level `image_newline` of the 4.x names.
NEXT_STOCK_KEY_MAPPING = {**STOCK_KEY_MAPPING, "^image_newline": "model.image_newline"}

NEXT_AUTO_MAP = auto_map_for(
    "configuration_llava_ext_next.LlavaExtNextConfig",
    "modeling_llava_ext_next.LlavaExtNextModel",
    "modeling_llava_ext_next.LlavaExtNextForConditionalGeneration",
)


class LlavaExtNextPreTrainedModel(LlavaExtPreTrainedModel):
    config_class = LlavaExtNextConfig
    config: LlavaExtNextConfig
    stock_config_class = LlavaNextConfig
    stock_key_mapping = NEXT_STOCK_KEY_MAPPING
    auto_map_entries = NEXT_AUTO_MAP


class LlavaExtNextModel(LlavaExtNextPreTrainedModel, LlavaExtModel):
    """Vision tower + projector + `image_newline` + language model (no LM head), as `LlavaNextModel`."""

    def _build_submodules(self, config: LlavaExtNextConfig):
        super()._build_submodules(config)
        embed_std = 1 / config.text_config.hidden_size**0.5  # as LlavaNextModel draws it
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)

    # --- geometry: one place that says how many crops and tokens an image has -------------------------------------

    def num_crops(self, image_sizes: torch.Tensor, **image_kwargs) -> list[int]:
        """Crops (base view + tiles) each image of `image_sizes` `(num_images, 2)` was processed into."""
        vision = self.config.vision_config
        return [num_tiles(size, self.config.image_grid_pinpoints, vision.image_size) for size in image_sizes]

    def num_image_tokens(self, image_sizes: torch.Tensor, vision_feature_select_strategy: str, **image_kwargs):
        """Tokens each image of `image_sizes` expands to (`llava_ext.anyres`, as the processor counts); None where
        the tower's token layout is unknown."""
        vision = self.config.vision_config
        per_crop = num_image_features(vision, vision.image_size, vision.image_size, "full")
        if per_crop is None:
            return None
        geometry = {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "grid_pinpoints": self.config.image_grid_pinpoints,
            "vision_feature_select_strategy": vision_feature_select_strategy,
            "num_additional_image_tokens": per_crop - (vision.image_size // vision.patch_size) ** 2,
        }
        return [num_image_tokens_next(*size.tolist(), **geometry) for size in torch.as_tensor(image_sizes)]

    def check_image_token_count(
        self,
        special_image_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        vision_feature_select_strategy: str,
        image_sizes: torch.Tensor | None = None,
        **image_kwargs,
    ) -> bool:
        """Raise a ValueError naming both counts if the placeholders cannot hold the images' features (before the
        vision tower runs); returns whether the count was checked (not for unknown towers, nor while compiling)."""
        if image_sizes is None:
            raise ValueError(
                "pixel_values were given without image_sizes; anyres models need each image's original (height, "
                "width) to lay out its tiles: pass the processor's `image_sizes` along with `pixel_values`."
            )
        if torch.compiler.is_compiling():
            return False
        per_image = self.num_image_tokens(image_sizes, vision_feature_select_strategy, **image_kwargs)
        if per_image is None:
            return False
        num_tokens = int(special_image_mask.sum())
        if num_tokens == sum(per_image):
            return True
        sizes = ", ".join("x".join(map(str, size)) for size in torch.as_tensor(image_sizes).tolist())
        raise image_token_mismatch_error(
            num_tokens,
            per_image,
            f"{len(per_image)} image(s) of {sizes} (original height x width) give {sum(per_image)} features "
            f"({', '.join(map(str, per_image))}; tile {self.config.vision_config.image_size}, patch size "
            f"{self.config.vision_config.patch_size}, strategy '{vision_feature_select_strategy}')",
            vision_feature_select_strategy,
            anyres=True,
        )

    # --- features ----------------------------------------------------------------------------------------------

    def _gather_crops(self, pixel_values: torch.Tensor, crops: list[int]) -> torch.Tensor:
        """`(total_crops, C, H, W)` from the processor's padded `(num_images, max_crops, C, H, W)` (or already flat)."""
        if pixel_values.dim() == 5:
            short = [(index, n) for index, n in enumerate(crops) if n > pixel_values.shape[1]]
            if short or len(crops) != pixel_values.shape[0]:
                raise ValueError(
                    f"pixel_values of shape {tuple(pixel_values.shape)} hold {pixel_values.shape[1]} crops for each "
                    f"of {pixel_values.shape[0]} images, but image_sizes and image_grid_pinpoints give "
                    f"{len(crops)} images of {crops} crops: process the images with this model's "
                    "image_grid_pinpoints and pass the processor's image_sizes unchanged."
                )
            return torch.cat([values[:n] for values, n in zip(pixel_values, crops)])  # (total_crops, C, H, W)
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(crops):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the {sum(crops)} crops image_sizes "
                "and image_grid_pinpoints give; pass the processor's (num_images, num_crops, C, H, W) pixel_values."
            )
        return pixel_values

    @_can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Projected, packed anyres image features, with the tower's states and attentions when asked for.

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, num_crops, channels, height, width)`): each image's
                base view and tiles, as the processor returns them (padded crops are ignored).
            image_sizes (`torch.Tensor` of shape `(num_images, 2)`): each image's original `(height, width)`.
            vision_feature_layer (`int` or `list[int]`, *optional*): overrides `config.vision_feature_layer`.
            vision_feature_select_strategy (`str`, *optional*): overrides `config.vision_feature_select_strategy`.
            output_hidden_states (`bool`, *optional*), output_attentions (`bool`, *optional*), return_dict (`bool`,
                *optional*): as `LlavaExtModel.get_image_features`.

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` is a list with one `(num_image_tokens, text_hidden)` tensor
            per image (base view, then the unpadded tile rows each ended by `image_newline`), as the reference.
        """
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        image_kwargs = {key: kwargs.pop(key) for key in ("batch_num_images", "vision_aspect_ratio") if key in kwargs}
        crops = self.num_crops(image_sizes, **image_kwargs)
        pixel_values = self._gather_crops(pixel_values, crops)
        features, output = self._encode_images(
            pixel_values, vision_feature_layer, strategy, output_hidden_states, output_attentions, **kwargs
        )
        features = torch.split(features, crops)  # per image: (num_crops, tokens_per_crop, text_hidden)
        output.pooler_output, _ = self.pack_image_features(
            features, image_sizes, strategy, image_newline=self.image_newline, **image_kwargs
        )
        return output

    def pack_image_features(
        self, image_features, image_sizes, vision_feature_select_strategy=None, image_newline=None, **image_kwargs
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each image's crops' features as its token sequence (see the module docstring), as the reference.

        Args:
            image_features (`list[torch.Tensor]`): per image, `(num_crops, tokens_per_crop, text_hidden)`.
            image_sizes (`torch.Tensor` of shape `(num_images, 2)`): original `(height, width)` of each image.
            vision_feature_select_strategy (`str`, *optional*): unused; kept for the reference's signature.
            image_newline (`torch.Tensor` of shape `(text_hidden,)`, *optional*): appended to every row.

        Returns:
            `list[torch.Tensor]` of `(num_image_tokens, text_hidden)` and their lengths `(num_images,)`.
        """
        tile, pinpoints = self.config.vision_config.image_size, self.config.image_grid_pinpoints
        side = tile // self.config.vision_config.patch_size  # patches per tile side
        packed = []
        for image_size, feature in zip(image_sizes, image_features):
            if feature.shape[0] == 1:  # the base view alone
                tail = image_newline[None].to(feature) if image_newline is not None else feature[:0, 0]
                packed.append(torch.cat((feature[0], tail)))  # (tokens_per_crop + 1, text_hidden)
                continue
            base, tiles = feature[0], feature[1:]
            rows, cols = image_grid_shape(image_size, pinpoints, tile)
            tiles = tiles.view(rows, cols, side, side, -1)  # (rows, cols, side, side, text_hidden)
            # (text_hidden, rows * side, cols * side): the tiles as one map, row-major as the image
            feature_map = tiles.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            feature_map = unpad_image(feature_map, image_size)  # (text_hidden, height, width)
            feature_map = self._resize_feature_map(feature_map, side, **image_kwargs)
            if image_newline is not None:
                newline = image_newline[:, None, None].expand(*feature_map.shape[:-1], 1)  # (text_hidden, height, 1)
                feature_map = torch.cat((feature_map, newline.to(feature_map)), dim=-1)
            # (height * (width + 1), text_hidden) after the base view's tokens
            packed.append(torch.cat((base, feature_map.flatten(1, 2).transpose(0, 1))))
        lengths = torch.tensor([len(feature) for feature in packed], dtype=torch.long, device=packed[0].device)
        return packed, lengths

    def _resize_feature_map(self, feature_map: torch.Tensor, side: int, **image_kwargs) -> torch.Tensor:
        """NeXT keeps the unpadded map as it is; OneVision shrinks large ones."""
        return feature_map

    @_can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        """Same arguments (in the same order) and outputs as transformers' `LlavaNextModel.forward` in the installed
        release; the KV cache is accepted as `cache` or `past_key_values`."""
        return super().forward(
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


# GenerationMixin is named among the bases (it is inherited already), as transformers' generation models name it.
class LlavaExtNextForConditionalGeneration(
    LlavaExtNextPreTrainedModel, LlavaExtForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT with a language-model head; same forward signature and outputs as
    `LlavaNextForConditionalGeneration`. `generate()` is transformers' own: `pixel_values` and `image_sizes` reach
    the model on the prefill step only."""

    base_model_class = LlavaExtNextModel

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy=None, image_newline=None):
        """See `LlavaExtNextModel.pack_image_features`."""
        return self.model.pack_image_features(image_features, image_sizes, vision_feature_select_strategy, image_newline)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """See `LlavaExtNextModel.get_image_features`."""
        return self.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    @_can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """Same arguments (in the same order) and outputs as `LlavaNextForConditionalGeneration.forward` in the
        installed release; `labels` of -100 are ignored by the loss."""
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            return_dict=True,
            **kwargs,
        )


__all__ = [
    "NEXT_AUTO_MAP",
    "NEXT_STOCK_KEY_MAPPING",
    "LlavaExtNextForConditionalGeneration",
    "LlavaExtNextModel",
    "LlavaExtNextPreTrainedModel",
]
