"""Processor for LLaVA: transformers' `LlavaProcessor` with named chat templates and errors that name their cause.

    text "USER: <image>\\nWhat is it? ASSISTANT:"  +  images [img]
      |  check: '<image>' markers == images, patch_size known        (before any image is decoded)
      v
    image processor -> pixel_values (num_images, 3, crop, crop)     (each image checked first, errors name it)
      |  each '<image>' -> (crop // patch_size)^2 + num_additional_image_tokens - (strategy == "default") copies
      |  check: at least one token per image, one image list per sample with as many images as its markers
      v
    tokenizer -> input_ids, attention_mask                          (a text starting with "<s>": that one BOS only)
      |  check: every expanded image token survived truncation (else: raise max_length)
      v
    BatchFeature(input_ids, attention_mask, pixel_values[, mm_token_type_ids])

Chat templates are Jinja files in `chat_templates/` chosen by name (`CHAT_TEMPLATE_NAMES`: "llava-1.5", "mistral",
"chatml", "llama-3", "llava-1.6-vicuna", "llava-onevision");
"llava-1.5" is the default. This file is copied next to checkpoints for `trust_remote_code` (imports: standard library,
names exported by the top-level `transformers` package, and the image processor file beside it, so it keeps working on
newer transformers releases); there the template comes from the checkpoint's `chat_template.jinja`.
"""

from pathlib import Path

from transformers import LlavaProcessor, ProcessorMixin

from .image_processing_llava_ext import _images_per_sample, _make_flat_list_of_images

CHAT_TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
CHAT_TEMPLATE_NAMES = ("llava-1.5", "mistral", "chatml", "llama-3", "llava-1.6-vicuna", "llava-onevision")
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


def _check_text(text) -> None:
    """`text` is None, a string or a non-empty list of strings; anything else raises naming what it is."""
    if text is None or isinstance(text, str):
        return
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text has type {type(text).__name__}; pass a string or a list of strings (one per sample).")
    if not text:
        raise ValueError("text is an empty list; pass a string or a non-empty list of strings (one per sample).")
    for index, sample in enumerate(text):
        if not isinstance(sample, str):
            raise TypeError(
                f"text[{index}] has type {type(sample).__name__}, not str; pass a string or a list of strings (one "
                "per sample)."
            )


def _size_of(size) -> tuple[int, int] | None:
    """(height, width) of a `{"height", "width"}` dict or transformers `SizeDict`; None for other size rules."""
    height = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else None)
    width = getattr(size, "width", None) or (size.get("width") if isinstance(size, dict) else None)
    return (height, width) if height and width else None


def _requested_special_tokens(kwargs: dict) -> bool | None:
    """The caller's `add_special_tokens` (top level or in `text_kwargs`); None when not given."""
    if "add_special_tokens" in kwargs:
        return kwargs["add_special_tokens"]
    return (kwargs.get("text_kwargs") or {}).get("add_special_tokens")


def _with_special_tokens(kwargs: dict) -> dict:
    """`kwargs` with `add_special_tokens=True` where the caller had put `add_special_tokens`."""
    if "add_special_tokens" in (kwargs.get("text_kwargs") or {}):
        return {**kwargs, "text_kwargs": {**kwargs["text_kwargs"], "add_special_tokens": True}}
    return {**kwargs, "add_special_tokens": True}


def _shift_offsets(outputs, rows: list[bool], shift: int) -> None:
    """Make the character offsets of `rows` (whose text lost its first `shift` characters) point into the caller's text.

    Zero-width spans (the tokenizer's BOS, padding) stay as they are: no character of the text is theirs.
    """
    offsets = outputs.get("offset_mapping")
    replacements = outputs.get("text_replacement_offsets")  # per sample: [{"span": .., "new_span": .., ...}, ...]
    for row in [index for index, shifted in enumerate(rows) if shifted]:
        if offsets is not None and hasattr(offsets[row], "shape"):  # a tensor or array: (seq, 2)
            spans = offsets[row]
            spans[spans[:, 1] > spans[:, 0]] += shift
        elif offsets is not None:
            offsets[row] = [(a + shift, b + shift) if b > a else (a, b) for a, b in offsets[row]]  # (start, end)
        if replacements:
            replacements[row] = [
                {**item, "span": tuple(char + shift for char in item["span"]),
                 "new_span": tuple(char + shift for char in item["new_span"])}
                for item in replacements[row]
            ]


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

    - `chat_template` accepts a bundled template name ("llava-1.5" (default) or another of `CHAT_TEMPLATE_NAMES`), here
      and in `apply_chat_template(..., chat_template=name)`; every template marks answers with `{% generation %}`.
    - A mismatch between `<image>` markers and images, a missing `patch_size`, and truncation that would cut image
      tokens raise a `ValueError` naming the counts and the fix, before images are processed where possible.
    - A text that starts with the tokenizer's `bos_token` (the "llava-1.5", "llava-1.6-vicuna", "mistral" and
      "llama-3" templates render it, so that callers tokenizing with `add_special_tokens=False`, like TRL, get it) is
      given exactly one BOS. See `__call__` for where this differs from `LlavaProcessor`.

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
        if patch_size is not None and not (isinstance(patch_size, int) and patch_size > 0):
            raise ValueError(
                f"patch_size={patch_size!r} is not a positive int; pass the tower's config.vision_config.patch_size "
                "(14 for CLIP ViT-L/14), or None."
            )
        if vision_feature_select_strategy not in (None, "default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r} is not one of 'default' (drop the "
                "CLS feature), 'full' (keep it) or None; pass config.vision_feature_select_strategy."
            )
        if not (isinstance(num_additional_image_tokens, int) and num_additional_image_tokens >= 0):
            raise ValueError(
                f"num_additional_image_tokens={num_additional_image_tokens!r} is not an int >= 0; pass 1 for CLIP "
                "towers (their CLS token), 0 for SigLIP."
            )
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

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        r"""
        [`LlavaProcessor.__call__`], except for texts that start with the tokenizer's `bos_token`, as the bundled
        templates render them ("llava-1.5", "llava-1.6-vicuna", "mistral", "llama-3"): such a sample is encoded as
        the BOS the tokenizer adds followed by the ids of the rest of the text, i.e. exactly the ids `LlavaProcessor`
        gives for the text without its leading BOS string:

            "<s>USER: <image>\nHi ASSISTANT:"  ->  tokenizer("USER: <image x16>\nHi ASSISTANT:")  ->  [<s>, ...]

        Differences from `LlavaProcessor` on the same text (identical ids everywhere else):

        - `add_special_tokens` not given (or True), as in `processor(text=processor.apply_chat_template(...))`:
          `LlavaProcessor` adds the tokenizer's BOS in front of the rendered one, two BOS; here one, per sample.
        - `add_special_tokens=False` (TRL's collators, and `apply_chat_template(tokenize=True)`, which sets it when
          the prompt starts with the BOS) and every sample starts with the BOS: `LlavaProcessor` tokenizes the text
          literally. That is the same one BOS, and the same ids for most tokenizers; but a tokenizer that adds its
          word-start marker only at the very start of a text (transformers' `LlamaTokenizer` with `legacy=False`:
          Metaspace `prepend_scheme="first"`) then encodes the first word after the BOS without it ("USER" instead of
          "▁USER"), unlike the ids the format was trained on; here the first word keeps it. A batch with the
          BOS on some samples only is tokenized literally, as `LlavaProcessor` does (one tokenizer call cannot add a
          BOS to some samples and not others).

        Nothing changes when the tokenizer would not add exactly one BOS by itself (no `bos_token`, `add_bos_token`
        off, or an EOS added too). `offset_mapping` and `text_replacement_offsets` index the text as given.
        """
        _check_text(text)
        text, shifted, kwargs = self._without_rendered_bos(text, kwargs)
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if any(shifted):
            _shift_offsets(outputs, shifted, len(self.tokenizer.bos_token))
        return outputs

    def _without_rendered_bos(self, text, kwargs: dict) -> tuple:
        """(text, which samples lost their leading BOS string, kwargs) for `__call__`; see its docstring."""
        bos_token = getattr(self.tokenizer, "bos_token", None)
        if text is None or not bos_token:
            return text, [], kwargs
        samples = [text] if isinstance(text, str) else list(text)
        starts = [sample.startswith(bos_token) for sample in samples]
        requested = _requested_special_tokens(kwargs)
        if not any(starts) or (requested is False and not all(starts)) or not self._tokenizer_adds_only_bos():
            return text, [], kwargs
        samples = [sample[len(bos_token) :] if start else sample for sample, start in zip(samples, starts)]
        if requested is False:  # every sample had its BOS in the text: the tokenizer now adds it back
            kwargs = _with_special_tokens(kwargs)
        return (samples[0] if isinstance(text, str) else samples), starts, kwargs

    def _tokenizer_adds_only_bos(self) -> bool:
        """Whether the tokenizer's special tokens for one text are exactly its BOS in front."""
        tokenizer = self.tokenizer
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"] == [tokenizer.bos_token_id, *plain]

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _check_text(text)
        images, text, videos, audio = super().prepare_inputs_layout(
            images=images, text=text, videos=videos, audio=audio, **kwargs
        )
        if images is not None and not _make_flat_list_of_images(images):
            images = None  # [] or one empty list per sample: a text-only batch, not an image processor error
        return images, text, videos, audio

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _check_text(text)
        samples = [text] if isinstance(text, str) else text
        if text is not None and (images is not None or any(self.image_token in sample for sample in samples)):
            markers = [sample.count(self.image_token) for sample in samples]
            num_images = 0 if images is None else len(_make_flat_list_of_images(images))
            if sum(markers) != num_images:
                raise ValueError(
                    f"The text has {sum(markers)} '{self.image_token}' markers (per sample: {markers}) but "
                    f"{num_images} images were given; put one '{self.image_token}' in the text per image, in order "
                    "(or let apply_chat_template place them)."
                )
            per_sample = _images_per_sample(images)
            if per_sample is not None and len(per_sample) != len(markers):
                raise ValueError(
                    f"images has {len(per_sample)} per-sample lists but the text has {len(markers)} samples; pass one "
                    "list of images per sample (an empty one for a sample without images), or a flat list."
                )
            if per_sample is not None and per_sample != markers:
                sample = next(index for index, (m, n) in enumerate(zip(markers, per_sample)) if m != n)
                raise ValueError(
                    f"Sample {sample} has {markers[sample]} '{self.image_token}' markers but its image list has "
                    f"{per_sample[sample]} images (markers per sample: {markers}, images per sample: {per_sample}); "
                    "give each sample the list of its own images, in the order of its markers."
                )
            if num_images and self.patch_size is None:
                raise ValueError(
                    "patch_size is None, so the number of tokens per image is unknown; pass "
                    "patch_size=config.vision_config.patch_size (and num_additional_image_tokens=1 for CLIP towers)."
                )
        # transformers' own count (5.2x) gets the flat list as (channels, height, width) images: it takes neither
        # mixed nesting, nested 4-D batches nor (height, width) grey arrays, all of which are settled above
        if images is not None:
            flat = _make_flat_list_of_images(images)
            images = [image[None] if getattr(image, "ndim", 0) == 2 else image for image in flat]
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _tokens_per_image(self, height: int, width: int) -> int:
        """Image tokens one `height` x `width` image (as processed) expands to; raises if that is less than one.

        The rule of `llava_ext.vision.num_image_features`: one per patch, plus the tower's additional (CLS) tokens,
        minus one for the "default" strategy.
        """
        num_tokens = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        num_tokens -= int(self.vision_feature_select_strategy == "default")
        if num_tokens < 1:
            raise ValueError(
                f"A {height}x{width} image gives {num_tokens} image tokens with patch_size={self.patch_size}, "
                f"num_additional_image_tokens={self.num_additional_image_tokens} and vision_feature_select_strategy="
                f"{self.vision_feature_select_strategy!r}: the image must span at least one patch. Raise crop_size to "
                "the tower's image_size, or check patch_size."
            )
        return num_tokens

    def _process_images(self, images, **kwargs):
        images = _make_flat_list_of_images(images)
        crop = _size_of(kwargs.get("crop_size") or getattr(self.image_processor, "crop_size", None))
        do_center_crop = kwargs.get("do_center_crop")
        if do_center_crop is None:
            do_center_crop = getattr(self.image_processor, "do_center_crop", False)
        if crop and do_center_crop:
            self._tokens_per_image(*crop)  # a crop smaller than a patch fails here, before any image is processed
        processed = self.image_processor(images, **kwargs)
        replacements = [self.replace_image_token(processed, image_idx=index, **kwargs) for index in range(len(images))]
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]  # (channels, height, width)
        return self.image_token * self._tokens_per_image(height, width)

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        try:
            super()._check_special_mm_tokens(text, text_inputs, modalities)
        except ValueError as error:
            input_ids = text_inputs["input_ids"]
            input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
            placeholders = [("image", self.image_token, self.image_token_id)]
            if getattr(self, "video_token", None) is not None:  # OneVision's processor expands videos too
                placeholders.append(("video", self.video_token, self.video_token_id))
            for index, (sample, ids) in enumerate(zip(text, input_ids)):
                for kind, token, token_id in placeholders:
                    expected, kept = sample.count(token), list(ids).count(token_id)
                    if expected != kept:
                        full_length = len(self.tokenizer(sample)["input_ids"])
                        raise ValueError(
                            f"Truncation would cut {kind} tokens: sample {index} has {expected} {kind} tokens after "
                            f"expanding '{token}', but only {kept} are left in its {len(ids)} tokens. Raise "
                            f"max_length to at least {full_length} (the sample's full length) or pass truncation=False."
                        ) from error
            raise


__all__ = ["CHAT_TEMPLATE_NAMES", "LlavaExtProcessor", "image_assistant_masks_supported", "load_chat_template"]
