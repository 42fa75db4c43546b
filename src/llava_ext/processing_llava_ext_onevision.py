"""Processor for LLaVA-OneVision (and LLaVA-Interleave's format): images, several images per sample, and videos.

    text "<|im_start|>user\\n<image>\\n<video>\\nWhat?..."  +  images [[img] per sample]  +  videos [[frames] per sample]
      |  check: '<image>' / '<video>' markers == images / videos (per sample too), patch_size known
      v
    LlavaExtOnevisionImageProcessor -> pixel_values, image_sizes, batch_num_images; preprocess_videos ->
                                       pixel_values_videos (num_videos, num_frames, 3, h, w)
      |  each '<image>' -> anyres.num_image_tokens_onevision(h, w, ..., multi_image=(its sample has > 1 image))
      |  each '<video>' -> anyres.num_video_tokens_onevision(num_frames, image_size=h, patch_size)
      v
    tokenizer -> input_ids, attention_mask;  check: no image or video token cut by truncation

The counts are the functions the model checks its features against (`llava_ext.anyres`); `input_ids` equal
transformers' `LlavaOnevisionProcessor` on the same tokenizer, images and frames. A flat list of images counts as one
image per sample, as transformers counts it; give one list per sample (as `apply_chat_template` does) to put several
images in one sample, which OneVision encodes as one crop each.

Videos need no torchvision here: their frames go through the image processor's PIL path (`preprocess_videos`), which
stands in as this processor's `video_processor`. This file is copied next to checkpoints for `trust_remote_code`: it
imports only names exported by the top-level `transformers` package, the standard library, NumPy and the llava_ext
files beside it.
"""

import numpy as np

from .anyres import max_tiles, num_image_tokens_onevision, num_video_tokens_onevision
from .image_processing_llava_ext import _make_flat_list_of_images
from .image_processing_llava_ext_next import tile_side
from .image_processing_llava_ext_onevision import _is_video, make_list_of_videos
from .processing_llava_ext import CHAT_TEMPLATE_DIR
from .processing_llava_ext_next import LlavaExtNextProcessor, image_size_of

DEFAULT_ONEVISION_CHAT_TEMPLATE = "llava-onevision"


def _videos_per_sample(videos) -> list[int] | None:
    """How many videos each sample's list holds when `videos` is one list of videos per sample; None otherwise."""
    if not isinstance(videos, (list, tuple)) or not videos or _is_video(videos):
        return None
    if not all(isinstance(sample, (list, tuple)) and not _is_video(sample) for sample in videos):
        return None  # a flat batch of videos (each a list of frames or an array)
    return [len(make_list_of_videos(sample)) if sample else 0 for sample in videos]


class LlavaExtOnevisionProcessor(LlavaExtNextProcessor):
    r"""
    LLaVA-OneVision processor: an image processor (images, and video frames) and a tokenizer, expanding each
    `<image>` and `<video>` into the tokens the model makes of it. Inputs and outputs are those of transformers'
    [`LlavaOnevisionProcessor`] (`pixel_values`, `image_sizes`, `batch_num_images`, `pixel_values_videos`); the
    checks, bundled chat templates and BOS handling are [`LlavaExtProcessor`]'s (through [`LlavaExtNextProcessor`],
    whose count this one swaps for OneVision's), extended to videos. The default
    template is "llava-onevision", the llava-hf checkpoints' ChatML.

    Args:
        image_processor ([`LlavaExtOnevisionImageProcessor`]):
            Turns images into `pixel_values` and video frames into `pixel_values_videos` (`preprocess_videos`).
        tokenizer ([`PreTrainedTokenizerBase`]):
            Tokenizer whose vocabulary has `image_token` and `video_token` as one token each.
        patch_size (`int`, *optional*):
            Patch size of the vision tower (`config.vision_config.patch_size`, 14 for SigLIP so400m-patch14-384).
            transformers' processor takes `num_image_tokens` (729) instead: that is `(image_size // patch_size) ** 2`.
        vision_feature_select_strategy (`str`, *optional*):
            `"default"` drops each crop's first feature, `"full"` (OneVision's) keeps all; as the config's.
        chat_template (`str` or `dict`, *optional*, defaults to `"llava-onevision"`):
            A bundled template name or Jinja text.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder marking where an image goes in the text.
        video_token (`str`, *optional*, defaults to `"<video>"`):
            The placeholder marking where a video goes in the text.
        vision_aspect_ratio (`str`, *optional*, defaults to `"anyres_max_9"`):
            `config.vision_aspect_ratio`: a single image keeps at most N tiles' worth of features.
        num_additional_image_tokens (`int`, *optional*, defaults to 0):
            Tokens the tower adds to the patches: 0 for SigLIP (OneVision's tower), 1 for CLIP's CLS.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | dict | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        num_additional_image_tokens: int = 0,
        **kwargs,
    ):
        max_tiles(vision_aspect_ratio)  # "anyres_max_N", else a ValueError naming the fix
        if chat_template is None and CHAT_TEMPLATE_DIR.is_dir():
            chat_template = DEFAULT_ONEVISION_CHAT_TEMPLATE
        self.vision_aspect_ratio = vision_aspect_ratio
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        video_token_id = getattr(tokenizer, "video_token_id", None)
        self.video_token_id = video_token_id if video_token_id is not None else tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        if self.video_token_id is None or self.video_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no token {self.video_token!r} (video_token); add it as a special token "
                f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{self.video_token!r}]}})) and resize "
                "the model's embeddings, or pass the tokenizer's own video_token."
            )
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

    @property
    def video_processor(self):
        """Video frames go through the image processor (`preprocess_videos`): it stands in as the video processor."""
        return self.image_processor

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        samples = [text] if isinstance(text, str) else text
        if text is not None and isinstance(samples, (list, tuple)) and all(isinstance(s, str) for s in samples):
            markers = [sample.count(self.video_token) for sample in samples]
            flat = [] if videos is None else make_list_of_videos(videos)
            if sum(markers) != len(flat):
                raise ValueError(
                    f"The text has {sum(markers)} '{self.video_token}' markers (per sample: {markers}) but "
                    f"{len(flat)} videos were given; put one '{self.video_token}' in the text per video, in order "
                    "(or let apply_chat_template place them)."
                )
            per_sample = _videos_per_sample(videos)
            if per_sample is not None and per_sample != markers:
                raise ValueError(
                    f"The samples' '{self.video_token}' markers ({markers}) do not match their video lists "
                    f"({per_sample} videos); give each sample the list of its own videos (an empty one for none), in "
                    "the order of its markers."
                )
            if flat and self.patch_size is None:
                raise ValueError(
                    "patch_size is None, so the number of tokens per video frame is unknown; pass "
                    "patch_size=config.vision_config.patch_size."
                )
            # transformers' own check only counts videos (and cannot read every frame kind): hand it stand-ins
            videos = [np.zeros((1, 1, 1, 3), dtype=np.uint8)] * len(flat) if flat else None
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _process_images(self, images, **kwargs):
        # the image processor gets the per-sample nesting: a sample with several images is encoded differently
        processed = self.image_processor(images, **kwargs)
        replacements = [
            self.replace_image_token(processed, image_idx=index, **kwargs)
            for index in range(len(_make_flat_list_of_images(images)))
        ]
        return processed, replacements

    def _process_videos(self, videos, **kwargs):
        videos = make_list_of_videos(videos)
        valid = set(self.image_processor.valid_kwargs.__annotations__) | {"return_tensors"}
        processed = self.image_processor.preprocess_videos(videos, **{k: v for k, v in kwargs.items() if k in valid})
        replacements = [self.replace_video_token(processed, video_idx=index) for index in range(len(videos))]
        return processed, replacements

    def _anyres_count(self, height: int, width: int, *, multi_image: bool, **geometry) -> int:
        return num_image_tokens_onevision(
            height, width, vision_aspect_ratio=self.vision_aspect_ratio, multi_image=multi_image, **geometry
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        first = 0  # the image's sample: batch_num_images counts each sample's images, in order
        for count in image_inputs["batch_num_images"]:
            if image_idx < first + int(count):
                break
            first += int(count)
        tile = image_inputs["pixel_values"][image_idx].shape[-1]  # (crops, channels, tile, tile)
        height, width = image_size_of(image_inputs, image_idx)
        num_tokens = self._num_image_tokens(height, width, tile, kwargs.get("image_grid_pinpoints"), int(count) > 1)
        return self.image_token * num_tokens

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        frames = video_inputs["pixel_values_videos"][video_idx]  # (num_frames, channels, height, width)
        self._tokens_per_image(*frames.shape[-2:])  # a frame spans a patch, else a named error
        num_tokens = num_video_tokens_onevision(frames.shape[0], image_size=frames.shape[-2], patch_size=self.patch_size)
        return self.video_token * num_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        """Placeholder tokens per single image of the given `(height, width)` and per video of the given
        `(num_frames, height, width)` (the helper vLLM calls)."""
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes)
        if video_sizes is not None:
            tile = tile_side(self.image_processor.size, self.image_processor.crop_size)  # frames are resized to it
            data.num_video_tokens = [
                num_video_tokens_onevision(int(frames), image_size=tile, patch_size=self.patch_size)
                for frames, _, _ in video_sizes
            ]
        return data


__all__ = ["LlavaExtOnevisionProcessor"]
