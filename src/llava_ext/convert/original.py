"""The original LLaVA checkpoint format (haotian-liu/LLaVA, `liuhaotian/llava-v1.5-*`) as data.

An original checkpoint is a Llama/Mistral causal LM with a projector at `model.mm_projector.{0,2}`; the CLIP tower
lives in a separate directory or repo named by `mm_vision_tower` (a whole `CLIPModel`, of which only the vision half
is kept). Keys are renamed to the on-disk layout transformers' `llava` writes (and `LlavaExtForConditionalGeneration`
reads): `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`.
`{}` stands for a layer index, `None` drops the key; a key in no table is an error that names it.
"""

import re

DECODER_LAYER_PARAMS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]
CLIP_LAYER_PARAMS = [
    f"{module}.{param}"
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                   "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    for param in ("weight", "bias")
]

ORIGINAL_TO_HF = {
    "model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
    "model.norm.weight": "language_model.model.norm.weight",
    "lm_head.weight": "language_model.lm_head.weight",
    **{f"model.layers.{{}}.{param}": f"language_model.model.layers.{{}}.{param}" for param in DECODER_LAYER_PARAMS},
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # a buffer old transformers saved; recomputed at load
    # Projector: mlp2x_gelu is nn.Sequential(Linear, GELU, Linear)
    "model.mm_projector.0.weight": "multi_modal_projector.linear_1.weight",
    "model.mm_projector.0.bias": "multi_modal_projector.linear_1.bias",
    "model.mm_projector.2.weight": "multi_modal_projector.linear_2.weight",
    "model.mm_projector.2.bias": "multi_modal_projector.linear_2.bias",
}

# A CLIPModel / CLIPVisionModel checkpoint (openai/clip-vit-large-patch14-336): the vision half is kept.
CLIP_TO_HF = {
    "vision_model.embeddings.class_embedding": "vision_tower.vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight": (
        "vision_tower.vision_model.embeddings.position_embedding.weight"
    ),
    "vision_model.embeddings.position_ids": None,  # a buffer, rebuilt at load
    "vision_model.pre_layrnorm.weight": "vision_tower.vision_model.pre_layrnorm.weight",
    "vision_model.pre_layrnorm.bias": "vision_tower.vision_model.pre_layrnorm.bias",
    **{
        f"vision_model.encoder.layers.{{}}.{param}": f"vision_tower.vision_model.encoder.layers.{{}}.{param}"
        for param in CLIP_LAYER_PARAMS
    },
    "vision_model.post_layernorm.weight": "vision_tower.vision_model.post_layernorm.weight",
    "vision_model.post_layernorm.bias": "vision_tower.vision_model.post_layernorm.bias",
    # the text half and the contrastive heads of a full CLIPModel are not part of LLaVA
    "text_model.embeddings.token_embedding.weight": None,
    "text_model.embeddings.position_embedding.weight": None,
    "text_model.embeddings.position_ids": None,
    **{f"text_model.encoder.layers.{{}}.{param}": None for param in CLIP_LAYER_PARAMS},
    "text_model.final_layer_norm.weight": None,
    "text_model.final_layer_norm.bias": None,
    "visual_projection.weight": None,
    "text_projection.weight": None,
    "logit_scale": None,
}

# A CLIPVisionModel saved by transformers >= 5 drops the `vision_model.` prefix.
CLIP_TO_HF.update(
    {key.removeprefix("vision_model."): value for key, value in CLIP_TO_HF.items() if key.startswith("vision_model.")}
)

# Some original checkpoints (fine-tuned towers) also carry the tower, under the LLaVA wrapper's prefix.
ORIGINAL_TO_HF.update(
    {
        f"model.vision_tower.vision_tower.{key}": value
        for key, value in CLIP_TO_HF.items()
        if key.startswith("vision_model.")
    }
)

ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
ORIGINAL_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
# mm_vision_select_feature -> vision_feature_select_strategy
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rename_key(
    key: str, table: dict[str, str | None], source: str = "checkpoint", tool: str = "`llava-ext convert`"
) -> str | None:
    """The new name of `key` under `table` (None: dropped); a `ValueError` naming the key (and `tool`, which does not
    support it) if the table lacks it."""
    match = _LAYER_INDEX.search(key)
    pattern, index = (key[: match.start()] + ".{}." + key[match.end() :], match.group(1)) if match else (key, None)
    if key in table:
        return table[key]
    if index is not None and pattern in table:
        target = table[pattern]
        return None if target is None else target.format(index)
    raise ValueError(
        f"Unknown key {key!r} in the {source}: no conversion rule for it. If this is a LLaVA variant with extra "
        f"modules (a different projector or backbone), it is not supported by {tool} yet."
    )


def expected_keys(table: dict[str, str | None], num_layers: int, prefix: str) -> set[str]:
    """Targets `table` must produce under `prefix` for a model with `num_layers` layers (to name missing weights)."""
    keys = set()
    for target in table.values():
        if target is None or not target.startswith(prefix):
            continue
        if "{}" in target:
            keys.update(target.format(index) for index in range(num_layers))
        else:
            keys.add(target)
    return keys


def original_text_model_type(config: dict) -> str | None:
    """'llama' / 'mistral' for an original LLaVA config.json, None if it is not one."""
    for architecture in config.get("architectures") or []:
        if architecture in ORIGINAL_ARCHITECTURES:
            return ORIGINAL_ARCHITECTURES[architecture]
    if config.get("model_type") in ORIGINAL_MODEL_TYPES:
        return ORIGINAL_MODEL_TYPES[config["model_type"]]
    if config.get("model_type") == "llava" and "mm_vision_tower" in config:  # llava-v1.5 says "llava"
        return "llama"
    return None


__all__ = [
    "CLIP_TO_HF",
    "ORIGINAL_TO_HF",
    "SELECT_FEATURE_TO_STRATEGY",
    "SUPPORTED_PROJECTORS",
    "expected_keys",
    "original_text_model_type",
    "rename_key",
]
