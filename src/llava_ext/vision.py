"""Vision towers that run only the encoder layers LLaVA reads.

LLaVA-1.5 reads hidden state -2 of a 24-layer CLIP: the last layer and the pooling head are computed and thrown away
by a stock `CLIPVisionModel` forward. The towers here are the stock classes (same modules, same state-dict keys, same
attention dispatch through transformers' attention interface) with one extra method, `select_hidden_states`, that
stops after the deepest requested layer and keeps only the requested states:

    pixel_values -> embeddings (-> pre_layrnorm for CLIP) = state 0 -> layer 1 -> state 1 -> ... -> state max(layers)

The unused layers keep their weights, so checkpoints round-trip unchanged. This file is copied next to checkpoints
for `trust_remote_code`: it imports only torch and transformers.
"""

import torch
from transformers import AutoModel, CLIPVisionModel, PreTrainedConfig, SiglipVisionModel


def normalize_layer_indices(layers: int | list[int], num_layers: int) -> list[int]:
    """`vision_feature_layer` as indices 0..num_layers into the tower's hidden states (0 = the embedding output)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [layer % (num_layers + 1) for layer in layers]


class _LayerSelectingTower:
    """Mixin for a CLIP-style tower with `embeddings` and `encoder.layers`; subclasses say how state 0 is made."""

    has_cls_token: bool

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        raise NotImplementedError

    def select_hidden_states(
        self, pixel_values: torch.Tensor, layers: list[int], interpolate_pos_encoding: bool = False, **kwargs
    ) -> list[torch.Tensor]:
        """Hidden states at `layers` (indices into the `num_hidden_layers + 1` states, negatives from the end)."""
        wanted = normalize_layer_indices(layers, len(self.encoder.layers))
        pixel_values = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        hidden_states = self._embed(pixel_values, interpolate_pos_encoding)  # (num_images, num_tokens, vision_hidden)
        kept = {0: hidden_states}
        for index, encoder_layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            hidden_states = encoder_layer(hidden_states, None, **kwargs)
            if index in wanted:
                kept[index] = hidden_states
        return [kept[index] for index in wanted]


class LlavaExtCLIPVisionModel(_LayerSelectingTower, CLIPVisionModel):
    has_cls_token = True

    def _embed(self, pixel_values, interpolate_pos_encoding):
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.pre_layrnorm(hidden_states)


class LlavaExtSiglipVisionModel(_LayerSelectingTower, SiglipVisionModel):
    has_cls_token = False

    def _embed(self, pixel_values, interpolate_pos_encoding):
        return self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)


VISION_TOWERS = {"clip_vision_model": LlavaExtCLIPVisionModel, "siglip_vision_model": LlavaExtSiglipVisionModel}
# transformers saves these towers under their stock class names' key layout; ours must read and write the same.
STOCK_TOWER_NAMES = {LlavaExtCLIPVisionModel: "CLIPVisionModel", LlavaExtSiglipVisionModel: "SiglipVisionModel"}


def build_vision_tower(vision_config: PreTrainedConfig) -> torch.nn.Module:
    """Our layer-selecting tower for CLIP/SigLIP configs; `AutoModel.from_config` for any other vision model."""
    tower_class = VISION_TOWERS.get(vision_config.model_type)
    if tower_class is None:
        return AutoModel.from_config(vision_config)
    return tower_class._from_config(vision_config)


def num_image_features(
    vision_config: PreTrainedConfig, height: int, width: int, vision_feature_select_strategy: str
) -> int | None:
    """Features one `height` x `width` image yields; None where the tower's token layout is unknown.

    The one rule shared by the processor's placeholder expansion and the model's check: one token per patch, plus the
    CLS token for CLIP, minus one token for the "default" strategy (which drops position 0, as transformers' LLaVA).
    """
    tower_class = VISION_TOWERS.get(vision_config.model_type)
    if tower_class is None:
        return None
    patch_size = vision_config.patch_size
    num_tokens = (height // patch_size) * (width // patch_size) + int(tower_class.has_cls_token)
    return num_tokens - int(vision_feature_select_strategy == "default")


__all__ = [
    "LlavaExtCLIPVisionModel",
    "LlavaExtSiglipVisionModel",
    "build_vision_tower",
    "normalize_layer_indices",
    "num_image_features",
]
