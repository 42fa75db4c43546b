"""Image processor for LLaVA-OneVision: transformers' `LlavaOnevisionImageProcessorPil` with llava_ext's input checks,
and video frames through the same PIL path.

    one image in a sample -> anyres, as LLaVA-NeXT: base view + tiles of the best pinpoint   (batch_num_images 1)
    n images in a sample's list -> each padded to a square with the mean colour, one crop  (batch_num_images n)
    video frames -> each resized to `size`, rescaled, normalized: pixel_values_videos (num_frames, 3, h, w)

Image pixel values equal transformers' `LlavaOnevisionImageProcessorPil` (the processing is inherited). A flat list
of images counts as one image per sample, as transformers counts it; pass one list per sample (as
`apply_chat_template` does) for several images in one sample. Added: the checks of `LlavaExtImageProcessor` on every
image and frame before any is processed, `image_grid_pinpoints` in multiples of the tile side, a named error for
crops that cannot stack, and `batch_num_images` counted after flattening (a 4-D array is its images, an empty sample
counts nothing), where transformers counts a list's items.

transformers' `LlavaOnevisionVideoProcessor` resizes with torchvision, which llava_ext does not use: frames here go
through PIL's bicubic resize, as images do, so they can differ from that processor's by about one grey level.

This file is copied next to checkpoints for `trust_remote_code`: it imports only names exported by the top-level
`transformers` package, the standard library, NumPy, PIL and the image processor files beside it.
"""

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature, LlavaOnevisionImageProcessorPil

from .image_processing_llava_ext import (
    CheckedImageInputsMixin,
    _describe_structure,
    _images_per_sample,
    _make_flat_list_of_images,
)
from .image_processing_llava_ext_next import check_grid_pinpoints, check_stackable, tile_side


def _is_frame(item) -> bool:
    """One video frame: a PIL image, a path/URL string, or a 2-D / 3-D array or tensor."""
    if isinstance(item, (PIL.Image.Image, str)):
        return True
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3)


def _is_video(item) -> bool:
    """One video: a 4-D (frames, ...) array or tensor, or a non-empty list of frames."""
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim == 4
    return isinstance(item, (list, tuple)) and bool(item) and all(_is_frame(frame) for frame in item)


def make_list_of_videos(videos) -> list:
    """One video, a list of videos, or one list of videos per sample -> a flat list of videos (a 5-D array is a batch).

    A video is a 4-D array / tensor of frames or a list of frames (PIL images, 3-D arrays or paths); raises naming
    the structure otherwise.
    """
    if _is_video(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (list, tuple)):
        flat = []
        for item in videos:
            if _is_video(item):
                flat.append(item)
            elif isinstance(item, (list, tuple)) and not any(_is_frame(element) for element in item):
                flat.extend(make_list_of_videos(item) if item else [])  # one sample's videos; [] is none
            else:
                break
        else:
            return flat
    raise ValueError(
        f"videos is {_describe_structure(videos)}, which is not a video, a list of videos or one list of videos per "
        "sample; pass each video as a list of frames (PIL images or (height, width, 3) arrays) or a 4-D array "
        "(frames, height, width, channels)."
    )


class LlavaExtOnevisionImageProcessor(CheckedImageInputsMixin, LlavaOnevisionImageProcessorPil):
    r"""
    LLaVA-OneVision image processor. A sample with one image gets LLaVA-NeXT's anyres crops (base view + tiles of the
    best `image_grid_pinpoints` resolution); an image sharing its sample's list with others is padded to a square
    with the mean colour and resized to one crop. Outputs `pixel_values` `(num_images, 1 + max_tiles, 3, h, w)`,
    `image_sizes` `(num_images, 2)` (original sizes) and `batch_num_images` (images per sample), as transformers'
    [`LlavaOnevisionImageProcessorPil`]. `preprocess_videos` turns video frames into `pixel_values_videos`.

    Images are read and checked as [`LlavaExtImageProcessor`] reads them; a bad one raises naming its position.

    Args:
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            The `[height, width]` resolutions an image may be tiled at; each a multiple of the tile side (`size`).
        **kwargs:
            Any [`ImagesKwargs`], as for `LlavaOnevisionImageProcessorPil`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_grid_pinpoints(self.image_grid_pinpoints, tile_side(self.size, self.crop_size))

    def preprocess(self, images, **kwargs) -> BatchFeature:
        per_sample = _images_per_sample(images)
        if per_sample is None:  # a flat batch: one image per sample, as transformers reads it
            batch_num_images = [1] * len(_make_flat_list_of_images(images))
        else:
            batch_num_images = [count for count in per_sample if count]  # text-only samples hold no image
        # LlavaOnevisionImageProcessorPil.preprocess counts the list's items instead; its own parent does the rest
        return super(LlavaOnevisionImageProcessorPil, self).preprocess(images, batch_num_images, **kwargs)

    def preprocess_videos(self, videos, **kwargs) -> BatchFeature:
        """Video frames -> `pixel_values_videos`: every frame resized to `size`, rescaled and normalized (no tiles).

        Args:
            videos: one video, a list of videos, or one list of videos per sample; a video is a list of frames (PIL
                images, arrays or paths, read and checked as images are) or a 4-D array (frames, height, width, C).
            **kwargs: [`ImagesKwargs`] overriding this processor's (`size`, `image_mean`, `return_tensors`, ...).

        Returns:
            [`BatchFeature`] with `pixel_values_videos`: one `(num_frames, 3, height, width)` array per video (one
            tensor `(num_videos, num_frames, 3, height, width)` with `return_tensors="pt"` when the frame counts match).
        """
        videos = make_list_of_videos(videos)
        return_tensors = kwargs.pop("return_tensors", None)
        frames = [super(LlavaOnevisionImageProcessorPil, self).preprocess(video, None, **kwargs) for video in videos]
        frames = [np.stack(video["pixel_values"]) for video in frames]  # (num_frames, 3, height, width) each
        if return_tensors is not None and len({video.shape for video in frames}) > 1:
            raise ValueError(
                f"The videos have different frame counts or sizes ({[video.shape for video in frames]}), so "
                f"pixel_values_videos cannot be one tensor (return_tensors={return_tensors!r}); sample the same number "
                "of frames from each video, or pass return_tensors=None for a list."
            )
        return BatchFeature(data={"pixel_values_videos": frames}, tensor_type=return_tensors)

    def _preprocess(self, images, batch_num_images, **kwargs) -> BatchFeature:
        if batch_num_images is None:  # video frames (preprocess_videos): the plain resize -> rescale -> normalize
            return super(LlavaOnevisionImageProcessorPil, self)._preprocess(
                images, **{**kwargs, "do_pad": False}
            )
        check_grid_pinpoints(kwargs["image_grid_pinpoints"], tile_side(kwargs["size"], kwargs["crop_size"]))
        do_pad, return_tensors = kwargs["do_pad"], kwargs["return_tensors"]
        outputs = super()._preprocess(images, batch_num_images, **{**kwargs, "return_tensors": None})
        check_stackable(outputs["pixel_values"], do_pad, return_tensors)
        return BatchFeature(data=dict(outputs), tensor_type=return_tensors)


__all__ = ["LlavaExtOnevisionImageProcessor", "make_list_of_videos"]
