"""Processor for LLaVA: transformers' `LlavaProcessor` with named chat templates and errors that name their cause.

    text "USER: <image>\\nWhat is it? ASSISTANT:"  +  images [img]
      |  check: '<image>' markers == images, patch_size known        (before any image is decoded)
      v
    image processor -> pixel_values (num_images, 3, crop, crop)
      |  each '<image>' -> (crop // patch_size)^2 + num_additional_image_tokens - (strategy == "default") copies
      v
    tokenizer -> input_ids, attention_mask
      |  check: every expanded image token survived truncation (else: raise max_length)
      v
    BatchFeature(input_ids, attention_mask, pixel_values[, mm_token_type_ids])

Chat templates are Jinja files in `chat_templates/` chosen by name ("llava-1.5", "mistral", "chatml", "llama-3");
"llava-1.5" is the default. This file is copied next to checkpoints for `trust_remote_code` (imports: standard library,
names exported by the top-level `transformers` package, and the image processor file beside it, so it keeps working on
newer transformers releases); there the template comes from the checkpoint's `chat_template.jinja`.
"""

from pathlib import Path

from transformers import LlavaProcessor, ProcessorMixin

from .image_processing_llava_ext import _make_flat_list_of_images

CHAT_TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
CHAT_TEMPLATE_NAMES = ("llava-1.5", "mistral", "chatml", "llama-3")
DEFAULT_CHAT_TEMPLATE = "llava-1.5"


def load_chat_template(name: str) -> str:
    """The Jinja text of a bundled chat template, by name (one of `CHAT_TEMPLATE_NAMES`)."""
    if name not in CHAT_TEMPLATE_NAMES:
        raise ValueError(
            f"chat_template={name!r} is neither a bundled template name ({', '.join(CHAT_TEMPLATE_NAMES)}) nor Jinja "
            "text; pass one of those names or a full Jinja template."
        )
    path = CHAT_TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        raise FileNotFoundError(
            f"Chat template {name!r} is not at {path} (remote code copied without llava_ext's chat_templates/ folder); "
            "install llava-ext, or pass the template's Jinja text as chat_template."
        )
    return path.read_text(encoding="utf-8")


def _resolve_template(chat_template: str | dict | None) -> str | dict | None:
    """A bundled template name -> its Jinja text; None -> the default template when the files are present."""
    if chat_template is None:
        return load_chat_template(DEFAULT_CHAT_TEMPLATE) if CHAT_TEMPLATE_DIR.is_dir() else None
    if isinstance(chat_template, str) and "{" not in chat_template:  # any real template has a {{ or {% in it
        return load_chat_template(chat_template)
    return chat_template


def _has_image(conversation: list) -> bool:
    """Whether a conversation (or a batch of them) has an image part in any message."""
    conversations = conversation if conversation and isinstance(conversation[0], list) else [conversation]
    return any(
        isinstance(part, dict) and part.get("type") == "image"
        for messages in conversations
        for message in messages
        if not isinstance(message["content"], str)
        for part in message["content"]
    )


def image_assistant_masks_supported() -> bool:
    """Whether the installed transformers aligns assistant masks with expanded image tokens.

    Older releases (5.17) map the template's assistant spans onto the text *after* each '<image>' was expanded, so the
    mask lands on prompt or image tokens: a silently wrong training label. The fix brought this method (5.2x).
    """
    return hasattr(ProcessorMixin, "_adjust_assistant_masks_indices")


class LlavaExtProcessor(LlavaProcessor):
    r"""
    LLaVA processor: an image processor and a tokenizer, expanding each `<image>` in the text into as many image tokens
    as the vision tower yields features. Inputs and outputs are those of transformers' [`LlavaProcessor`]; on top:

    - `chat_template` accepts a bundled template name ("llava-1.5" (default), "mistral", "chatml", "llama-3"), here
      and in `apply_chat_template(..., chat_template=name)`; every template marks answers with `{% generation %}`.
    - A mismatch between `<image>` markers and images, a missing `patch_size`, and truncation that would cut image
      tokens raise a `ValueError` naming the counts and the fix, before images are processed where possible.

    Args:
        image_processor ([`LlavaExtImageProcessor`] or any image processor):
            Turns images into `pixel_values`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            Tokenizer whose vocabulary has `image_token` as one token.
        patch_size (`int`, *optional*):
            Patch size of the vision tower (`config.vision_config.patch_size`, 14 for CLIP ViT-L/14).
        vision_feature_select_strategy (`str`, *optional*):
            `"default"` drops the first (CLS) feature, `"full"` keeps all; as `config.vision_feature_select_strategy`.
        chat_template (`str` or `dict`, *optional*, defaults to `"llava-1.5"`):
            A bundled template name or Jinja text.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder marking where an image goes in the text.
        num_additional_image_tokens (`int`, *optional*, defaults to 0):
            Tokens the tower adds to the patches: 1 for CLIP (CLS), 0 for SigLIP.
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
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=_resolve_template(chat_template),
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`; `chat_template` may also be a bundled template name."""
        if chat_template is not None and not (
            isinstance(self.chat_template, dict) and chat_template in self.chat_template
        ):
            chat_template = _resolve_template(chat_template)
        wants_mask = kwargs.get("return_assistant_tokens_mask")
        if wants_mask and not image_assistant_masks_supported() and _has_image(conversation):
            raise ValueError(
                "return_assistant_tokens_mask with images needs a newer transformers: this version misaligns the mask "
                "after image-token expansion. Upgrade transformers (5.23 works), or mask without images."
            )
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if text is not None and (images is not None or self.image_token in str(text)):
            samples = [text] if isinstance(text, str) else text
            markers = [sample.count(self.image_token) for sample in samples]
            num_images = 0 if images is None else len(_make_flat_list_of_images(images))
            if sum(markers) != num_images:
                raise ValueError(
                    f"The text has {sum(markers)} '{self.image_token}' markers (per sample: {markers}) but "
                    f"{num_images} images were given; put one '{self.image_token}' in the text per image, in order "
                    "(or let apply_chat_template place them)."
                )
            if num_images and self.patch_size is None:
                raise ValueError(
                    "patch_size is None, so the number of tokens per image is unknown; pass "
                    "patch_size=config.vision_config.patch_size (and num_additional_image_tokens=1 for CLIP towers)."
                )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        try:
            super()._check_special_mm_tokens(text, text_inputs, modalities)
        except ValueError as error:
            input_ids = text_inputs["input_ids"]
            input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
            for index, (sample, ids) in enumerate(zip(text, input_ids)):
                expected, kept = sample.count(self.image_token), list(ids).count(self.image_token_id)
                if expected != kept:
                    full_length = len(self.tokenizer(sample)["input_ids"])
                    raise ValueError(
                        f"Truncation would cut image tokens: sample {index} has {expected} image tokens after "
                        f"expanding '{self.image_token}', but only {kept} are left in its {len(ids)} tokens. Raise "
                        f"max_length to at least {full_length} (the sample's full length) or pass truncation=False."
                    ) from error
            raise


__all__ = ["CHAT_TEMPLATE_NAMES", "LlavaExtProcessor", "image_assistant_masks_supported", "load_chat_template"]
