"""Image processor for LLaVA: transformers' `LlavaImageProcessorPil` plus a batched torch path and named input errors.

Two interchangeable backends, picked per call or per instance with `image_backend`:

    "pil"   (default) upstream's per-image PIL/NumPy pipeline, bit-for-bit the reference's output
    "torch" decode once -> group same-sized images -> one uint8 channels-last batch per group:
            [pad to square] -> interpolate(bicubic, antialias) -> center crop -> fused rescale+normalize
            (torch's antialiased bicubic is Pillow's filter, so it agrees with "pil" to about one grey level)

Both backends check their inputs first: a missing file, an unreadable image or an empty (zero-sized) image raises a
`ValueError` naming the image's position in the flattened batch and its path. This file is copied next to checkpoints
for `trust_remote_code`: it imports only torch, names exported by the top-level `transformers` package and the standard
library (PIL and NumPy come with transformers' vision extras), so it keeps working on transformers releases newer than
the one it was saved with.
"""

import itertools
import os
from collections import defaultdict
from typing import Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import BatchFeature, ImagesKwargs, LlavaImageProcessorPil


class LlavaExtImagesKwargs(ImagesKwargs, total=False):
    """
    image_backend (`Literal["pil", "torch"]`, *optional*, defaults to `"pil"`):
        `"pil"` reproduces transformers' `LlavaImageProcessorPil` exactly; `"torch"` resizes each group of same-sized
        images as one batch (several times faster, within about one grey level of `"pil"`).
    """

    image_backend: Literal["pil", "torch"] | None


def _is_valid_image(image) -> bool:
    """transformers' `is_valid_image` (not a top-level export): a PIL image, NumPy array or torch tensor."""
    return isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor))


def _is_valid_list_of_images(images) -> bool:
    """transformers' `is_valid_list_of_images` (not a top-level export): a non-empty list of images."""
    return bool(images) and all(_is_valid_image(image) for image in images)


def _make_flat_list_of_images(images) -> list:
    """transformers' `make_flat_list_of_images` for 3-dim images (not a top-level export): same rules, same error."""
    if (
        isinstance(images, (list, tuple))
        and all(isinstance(sample, (list, tuple)) for sample in images)
        and all(_is_valid_list_of_images(sample) or not sample for sample in images)
    ):
        return [image for sample in images for image in sample]
    if isinstance(images, (list, tuple)) and _is_valid_list_of_images(images):
        if isinstance(images[0], PIL.Image.Image) or images[0].ndim == 3:
            return images
        if images[0].ndim == 4:
            return [image for batch in images for image in batch]
    if _is_valid_image(images):
        if isinstance(images, PIL.Image.Image) or images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
    raise ValueError(f"Could not make a flat list of images from {images}")


def _describe(source: str, limit: int = 120) -> str:
    """A path/URL short enough for an error message (base64 payloads can be megabytes)."""
    return source if len(source) <= limit else source[:limit] + "..."


def _is_empty(image) -> bool:
    """True for a PIL image, array or tensor with a zero-sized dimension."""
    shape = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape)
    return 0 in shape


class LlavaExtImageProcessor(LlavaImageProcessorPil):
    r"""
    LLaVA image processor: RGB conversion -> optional pad to square with the mean colour (LLaVA's `expand2square`,
    `do_pad=True`) -> resize shortest edge -> center crop -> rescale -> normalize. Defaults and outputs are those of
    transformers' [`LlavaImageProcessorPil`] (and of [`CLIPImageProcessor`] with `do_pad=False`).

    Images may be PIL images, NumPy arrays or torch tensors (channels first or last), file paths, http(s) URLs or
    base64 strings, a single image, a list, or a list of lists (one list per sample).

    Args:
        image_backend (`Literal["pil", "torch"]`, *optional*, defaults to `"pil"`):
            `"pil"` processes image by image with PIL/NumPy, equal to the reference. `"torch"` decodes every image
            once and resizes/crops/normalizes each group of same-sized images as one tensor batch
            (`torch.nn.functional.interpolate`, bicubic with antialiasing) on `device` (CPU unless given).
        **kwargs:
            Any [`ImagesKwargs`] (`size`, `crop_size`, `do_pad`, `image_mean`, ...), as for `LlavaImageProcessorPil`.
    """

    valid_kwargs = LlavaExtImagesKwargs  # what transformers reads to accept `image_backend` as a kwarg
    image_backend = "pil"

    def fetch_images(self, image_url_or_urls):
        """Load every path/URL/base64 string in a (nested) list of images; keeps the nesting and in-memory images."""
        position = itertools.count()  # flat index across the batch, the one error messages quote

        def fetch(item):
            if isinstance(item, (list, tuple)):
                return [fetch(element) for element in item]
            index = next(position)
            if isinstance(item, str):
                return self._load_image_source(item, index)
            if not _is_valid_image(item):
                raise TypeError(
                    f"Image {index} is a {type(item).__name__}; pass a PIL image, NumPy array, torch tensor, "
                    "file path or http(s) URL."
                )
            return item

        return fetch(image_url_or_urls)

    def _load_image_source(self, source: str, index: int) -> PIL.Image.Image:
        """Load a path, http(s) URL or base64 string with transformers' `load_image`; errors name the image."""
        is_remote = source.startswith(("http://", "https://", "data:image/"))
        try:
            # For one string the parent's `fetch_images` is `load_image`, which is not a top-level transformers export.
            image = super().fetch_images(source)
        except Exception as error:  # PIL, httpx and base64 raise many types; the user needs one, naming the image
            if not is_remote and not os.path.isfile(source):
                raise ValueError(
                    f"Image {index} ('{_describe(source)}') is not an existing file, an http(s) URL or base64 data; "
                    f"check the path (relative paths start at {os.getcwd()})."
                ) from error
            raise ValueError(
                f"Image {index} ('{_describe(source)}') could not be read as an image "
                f"({type(error).__name__}: {error}); check that the file is a complete image PIL can open "
                "(JPEG, PNG, WebP, ...)."
            ) from error
        if _is_empty(image):
            raise ValueError(
                f"Image {index} ('{_describe(source)}') is empty (size {image.size}); pass a non-empty image."
            )
        return image

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        images = super()._prepare_images_structure(images, expected_ndims=expected_ndims)
        for index, image in enumerate(images):
            if _is_empty(image):
                shape = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape)
                raise ValueError(f"Image {index} is empty (shape {shape}); pass a non-empty image.")
        return images

    def _preprocess_image_like_inputs(self, images, *args, image_backend: str | None = None, **kwargs):
        image_backend = image_backend or "pil"
        if image_backend == "pil":
            return super()._preprocess_image_like_inputs(images, *args, **kwargs)
        if image_backend != "torch":
            raise ValueError(f"image_backend={image_backend!r} is not one of 'pil', 'torch'; pick one of those two.")
        return self._preprocess_torch(self._prepare_image_like_inputs(images, **kwargs), **kwargs)

    def _preprocess_torch(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size,
        do_center_crop: bool,
        crop_size,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: tuple[float, ...] | None,
        image_std: tuple[float, ...] | None,
        do_pad: bool | None,
        return_tensors: str | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> BatchFeature:
        """The batched torch path: one resize/crop/normalize per group of same-sized images (channels first).

        `size` and `crop_size` are transformers' `SizeDict`s (`.shortest_edge`, `.height`, ...), as the PIL path gets.
        """
        groups = defaultdict(list)
        for index, image in enumerate(images):
            groups[image.shape].append(index)

        processed = [None] * len(images)
        for indices in groups.values():
            # (num_images, height, width, channels) in memory, viewed as NCHW channels-last: the layout decoded
            # images already have and the one torch's uint8 antialiased kernel is fast on. NumPy stacks: torch.stack
            # on strided views is far slower on a busy CPU.
            batch = np.stack([np.moveaxis(images[i], 0, -1) for i in indices])
            batch = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)  # (num_images, channels, height, width)
            if do_pad:
                fill = tuple(int(x * 255) for x in image_mean) if image_mean else (0,)
                batch = _pad_to_square(batch, fill)
            if do_resize:
                batch = _resize(batch, _output_size(batch[0], size))
            if do_center_crop:
                batch = _center_crop(batch, crop_size.height, crop_size.width)
            batch = _rescale_and_normalize(batch, rescale_factor if do_rescale else 1.0, image_mean, image_std, do_normalize)
            if len(groups) == 1 and return_tensors == "pt":
                return BatchFeature(data={"pixel_values": batch})
            for index, image in zip(indices, batch):
                processed[index] = image

        if return_tensors != "pt":
            processed = [image.cpu().numpy() for image in processed]
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


def _output_size(image: torch.Tensor, size) -> tuple[int, int]:
    """Resized (height, width) of a channels-first image for a `SizeDict` `size`, by the PIL path's rules."""
    if size.shortest_edge and not size.longest_edge:
        # transformers' `get_resize_output_image_size(default_to_square=False)`, which is not a top-level export
        height, width = image.shape[-2:]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(
        f"image_backend='torch' supports size={{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {dict(size)}; "
        "use image_backend='pil' for other size rules."
    )


def _rescale_and_normalize(
    batch: torch.Tensor, scale: float, mean: tuple[float, ...], std: tuple[float, ...], do_normalize: bool
) -> torch.Tensor:
    """(batch * scale - mean) / std as one multiply and one add, in place on a contiguous float32 copy."""
    channels = batch.shape[1]
    mean = torch.tensor(mean if do_normalize else (0.0,) * channels, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(std if do_normalize else (1.0,) * channels, device=batch.device).view(1, -1, 1, 1)
    # Contiguous uint8 first, then float: mixed layouts or uint8->float promotion inside the arithmetic send
    # TensorIterator down unvectorized paths that are ~10x slower than these three simple passes.
    batch = batch.contiguous().float()  # (num_images, channels, height, width)
    return batch.mul_(scale / std).add_(-mean / std)


def _pad_to_square(batch: torch.Tensor, fill: tuple[int, ...]) -> torch.Tensor:
    """Center `batch` on a square canvas of its longer side filled with `fill` (LLaVA's `expand2square`)."""
    num_images, channels, height, width = batch.shape
    side = max(height, width)
    if height == width:
        return batch
    fill = torch.tensor(fill + (0,) * (channels - len(fill)), dtype=batch.dtype, device=batch.device)
    canvas = fill.expand(num_images, side, side, channels).contiguous().permute(0, 3, 1, 2)  # channels-last
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, :, top : top + height, left : left + width] = batch
    return canvas


def _resize(batch: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize; uint8 stays uint8 (rounded, clamped) like PIL, on torch's fast uint8 kernel."""
    if tuple(batch.shape[-2:]) == tuple(output_size):
        return batch
    if batch.dtype == torch.uint8 and batch.device.type == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
        return F.interpolate(batch, size=output_size, mode="bicubic", antialias=True, align_corners=False)
    resized = F.interpolate(batch.float(), size=output_size, mode="bicubic", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8) if batch.dtype == torch.uint8 else resized


def _center_crop(batch: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
    """Center crop as transformers' `center_crop`, zero-padding (centered, rounded up) a side shorter than the crop."""
    height, width = batch.shape[-2:]
    pad_height, pad_width = max(crop_height - height, 0), max(crop_width - width, 0)
    if pad_height or pad_width:
        top, left = -(-pad_height // 2), -(-pad_width // 2)
        batch = F.pad(batch, (left, pad_width - left, top, pad_height - top))
        height, width = batch.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return batch[..., top : top + crop_height, left : left + crop_width]


__all__ = ["LlavaExtImageProcessor", "LlavaExtImagesKwargs"]
