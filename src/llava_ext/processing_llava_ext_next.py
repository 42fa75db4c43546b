"""Processor for LLaVA-NeXT: `LlavaExtProcessor` with anyres image-token counts from `llava_ext.anyres`.

    text "USER: <image>\\nWhat is it? ASSISTANT:"  +  images [img (h x w)]
      |  check: '<image>' markers == images (per sample too), patch_size known       (before any image is decoded)
      v
    LlavaExtNextImageProcessor -> pixel_values (num_images, 1 + max_tiles, 3, tile, tile), image_sizes [(h, w)]
      |  each '<image>' -> anyres.num_image_tokens_next(h, w, image_size=tile, patch_size, grid_pinpoints, ...)
      |                    = base view (p*p + CLS - "default") + unpadded rows * (cols + 1 newline)
      v
    tokenizer -> input_ids, attention_mask          (a text starting with "<s>": that one BOS only, as LlavaExtProcessor)
      |  check: every expanded image token survived truncation (else: raise max_length)
      v
    BatchFeature(input_ids, attention_mask, pixel_values, image_sizes)

The count is the function the model checks its features against (`llava_ext.anyres`), so the processor and the model
cannot round an image differently; `input_ids` equal transformers' `LlavaNextProcessor` on the same tokenizer, images
and settings. This file is copied next to checkpoints for `trust_remote_code`: it imports only names exported by the
top-level `transformers` package, the standard library and the llava_ext files beside it.
"""

from .anyres import num_image_tokens_next
from .image_processing_llava_ext_next import tile_side
from .processing_llava_ext import CHAT_TEMPLATE_DIR, LlavaExtProcessor

DEFAULT_NEXT_CHAT_TEMPLATE = "llava-1.6-vicuna"


def image_size_of(image_inputs: dict, image_idx: int) -> tuple[int, int]:
    """The original `(height, width)` of image `image_idx`, from `image_sizes` (a tensor, array or list of pairs)."""
    height, width = image_inputs["image_sizes"][image_idx]
    return int(height), int(width)


class LlavaExtNextProcessor(LlavaExtProcessor):
    r"""
    LLaVA-NeXT processor: an anyres image processor and a tokenizer, expanding each `<image>` into the tokens the
    model makes of that image (base view, then the unpadded tile rows each ended by a newline feature). Inputs and
    outputs are those of transformers' [`LlavaNextProcessor`]; the checks, bundled chat templates and BOS handling
    are [`LlavaExtProcessor`]'s (the default template is "llava-1.6-vicuna"; "mistral" is llava-v1.6-mistral's,
    "chatml" llava-v1.6-34b's).

    Args:
        image_processor ([`LlavaExtNextImageProcessor`]):
            Turns images into `pixel_values` and `image_sizes`; its `image_grid_pinpoints` and tile side (crop size)
            enter the count, so they must be the model's (`config.image_grid_pinpoints`, `vision_config.image_size`).
        tokenizer ([`PreTrainedTokenizerBase`]):
            Tokenizer whose vocabulary has `image_token` as one token.
        patch_size (`int`, *optional*):
            Patch size of the vision tower (`config.vision_config.patch_size`, 14 for CLIP ViT-L/14-336).
        vision_feature_select_strategy (`str`, *optional*):
            `"default"` drops each crop's first (CLS) feature, `"full"` keeps all; as the config's.
        chat_template (`str` or `dict`, *optional*, defaults to `"llava-1.6-vicuna"`):
            A bundled template name or Jinja text.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder marking where an image goes in the text.
        num_additional_image_tokens (`int`, *optional*, defaults to 0):
            Tokens the tower adds to the patches: 1 for CLIP (CLS, llava-v1.6's towers), 0 for SigLIP.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | dict | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        **kwargs,
    ):
        if chat_template is None and CHAT_TEMPLATE_DIR.is_dir():
            chat_template = DEFAULT_NEXT_CHAT_TEMPLATE
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    def _num_image_tokens(self, height: int, width: int, tile: int, grid_pinpoints=None, multi_image=False) -> int:
        """Tokens one `height` x `width` image expands to with `tile`-pixel crops (see `anyres`)."""
        self._tokens_per_image(tile, tile)  # the base view spans a patch, else a named error
        geometry = dict(
            image_size=tile,
            patch_size=self.patch_size,
            grid_pinpoints=grid_pinpoints or self.image_processor.image_grid_pinpoints,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            num_additional_image_tokens=self.num_additional_image_tokens,
        )
        return self._anyres_count(height, width, multi_image=multi_image, **geometry)

    def _anyres_count(self, height: int, width: int, *, multi_image: bool, **geometry) -> int:
        """The family's count from `anyres` (NeXT encodes every image alike, in a sample with others too)."""
        return num_image_tokens_next(height, width, **geometry)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        tile = image_inputs["pixel_values"][image_idx].shape[-1]  # (crops, channels, tile, tile)
        height, width = image_size_of(image_inputs, image_idx)
        return self.image_token * self._num_image_tokens(height, width, tile, kwargs.get("image_grid_pinpoints"))

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens per image of the given original `(height, width)` sizes (the helper vLLM calls)."""
        tile = tile_side(self.image_processor.size, self.image_processor.crop_size)
        # LlavaProcessor's builds the (non-exported) MultiModalData; its 1.5 counts are replaced by anyres ones
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, crop_size={"height": tile, "width": tile})
        if image_sizes is not None:
            data.num_image_tokens = [self._num_image_tokens(int(h), int(w), tile) for h, w in image_sizes]
        return data


__all__ = ["LlavaExtNextProcessor"]
