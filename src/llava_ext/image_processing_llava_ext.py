"""Image processor for LLaVA: transformers' `LlavaImageProcessorPil` plus a batched torch path and named input errors.

Two interchangeable backends, picked per call or per instance with `image_backend`:

    "pil"   (default) upstream's per-image PIL/NumPy pipeline, bit-for-bit the reference's output
    "torch" decode once -> group same-sized images -> one uint8 channels-last batch per group:
            [pad to square] -> interpolate(bicubic, antialias) -> center crop -> fused rescale+normalize
            (torch's antialiased bicubic is Pillow's filter, so it agrees with "pil" to about one grey level)

Both backends check every image before processing any, and read it the same way on every transformers release:

    PIL image       any mode PIL converts to RGB (L, LA, P, RGBA, CMYK, I;16, I, F, 1...; an animated GIF's current
                    frame), composited onto white where it has transparency (as transformers >= 5.2x does)
    array / tensor  (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 (the first axis wins when both could be C);
                    1 channel is grey, 4 are RGBA composited onto white; a 4-D array or tensor is a batch of images
                    uint8 as is; bool as black/white (like PIL mode "1"); other integers and floats must hold
                    0..255 pixel values (floats are rounded; with do_rescale=False floats are left as they are)

Anything else raises a `ValueError` / `TypeError` naming the image's position in the flattened batch (and its path,
mode, dtype or shape) and the fix: a missing file, an unreadable or empty image, an unknown layout or dtype, NaN or
out-of-range pixels, [0, 1] floats with do_rescale=True, a nesting deeper than one list per sample, no images at all.

This file is copied next to checkpoints for `trust_remote_code`: it imports only torch, names exported by the
top-level `transformers` package and the standard library (PIL and NumPy come with transformers' vision extras), so it
keeps working on transformers releases newer than the one it was saved with.
"""

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


CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA: what an array's first or last axis must hold to be its channels
_RGB_MODES: dict[str, bool] = {}  # PIL mode -> whether PIL converts it to RGB, probed once per mode


def _is_valid_image(image) -> bool:
    """transformers' `is_valid_image` (not a top-level export): a PIL image, NumPy array or torch tensor."""
    return isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor))


def _is_batch(image) -> bool:
    """A 4-D array or tensor: a batch of images along its first axis."""
    return isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4


def _describe_image(image) -> str:
    """'a 20x12 PIL image in mode 'La'', 'a float32 array of shape (12, 20, 3)': an image as error messages name it."""
    if isinstance(image, PIL.Image.Image):
        return f"a {image.width}x{image.height} PIL image in mode {image.mode!r}"
    if isinstance(image, np.ndarray):
        return f"{'an' if image.dtype.name[0] in 'aeio' else 'a'} {image.dtype} array of shape {image.shape}"
    if isinstance(image, torch.Tensor):
        return f"a {image.dtype} tensor of shape {tuple(image.shape)}"
    if isinstance(image, str):
        return repr(_describe(image, limit=40))
    return f"a {type(image).__name__}"


def _describe_structure(images, depth: int = 0) -> str:
    """The nesting of an `images` argument with its leaves named, e.g. '[[a 20x12 PIL image in mode 'RGB']]'."""
    if not isinstance(images, (list, tuple)):
        return _describe_image(images)
    if depth == 3:
        return "[...]"
    shown = ", ".join(_describe_structure(item, depth + 1) for item in images[:3])
    return f"[{shown}{', ...' if len(images) > 3 else ''}]"


def _make_flat_list_of_images(images) -> list:
    """One image, a list of images, or one list of images per sample -> a flat list; 4-D arrays/tensors are batches.

    transformers' `make_flat_list_of_images` (not a top-level export) with named errors; paths count as one image.
    """
    if not isinstance(images, (list, tuple)):
        return list(images) if _is_batch(images) else [images]
    nested = [isinstance(item, (list, tuple)) for item in images]
    if any(nested) and not all(nested):
        raise ValueError(
            f"images mixes images and lists at the top level ({_describe_structure(images)}); pass a list of images, "
            "or a list with one list of images per sample."
        )
    flat = []
    for sample in images if any(nested) else [images]:
        for image in sample:
            if isinstance(image, (list, tuple)):
                raise ValueError(
                    f"images is nested more than two lists deep ({_describe_structure(images)}); pass a list of "
                    "images, or a list with one list of images per sample."
                )
            flat.extend(list(image) if _is_batch(image) else [image])
    return flat


def _images_per_sample(images) -> list[int] | None:
    """How many images each sample's list holds when `images` is one list per sample; None for a flat batch."""
    if not (isinstance(images, (list, tuple)) and images and all(isinstance(s, (list, tuple)) for s in images)):
        return None
    return [len(_make_flat_list_of_images(list(sample))) for sample in images]


def _describe(source: str, limit: int = 120) -> str:
    """A path/URL short enough for an error message (base64 payloads can be megabytes)."""
    return source if len(source) <= limit else source[:limit] + "..."


def _is_empty(image) -> bool:
    """True for a PIL image, array or tensor with a zero-sized dimension."""
    shape = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape)
    return 0 in shape


def _converts_to_rgb(mode: str) -> bool:
    """Whether PIL converts `mode` to RGB and RGBA (the route for transparent images); 'La', for one, it does not."""
    if mode not in _RGB_MODES:
        probe = PIL.Image.new(mode, (1, 1))
        try:
            probe.convert("RGB"), probe.convert("RGBA")
            _RGB_MODES[mode] = True
        except ValueError:  # PIL's "conversion from La to L not supported"
            _RGB_MODES[mode] = False
    return _RGB_MODES[mode]


def _check_pil_image(index: int, image: PIL.Image.Image, do_convert_rgb: bool | None) -> None:
    """Decode a PIL image now and check its mode, so a broken file or odd mode is named before any processing."""
    try:
        image.load()  # a lazily opened, truncated file fails here rather than inside a resize
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Image {index} ({_describe_image(image)}) could not be decoded ({type(error).__name__}: {error}); check "
            "that the file is complete, or pass another image."
        ) from error
    if do_convert_rgb and not _converts_to_rgb(image.mode):
        raise ValueError(
            f"Image {index} is {_describe_image(image)}, which PIL cannot convert to RGB; convert it yourself first "
            "(to 'RGB', 'RGBA', 'L' or 'LA')."
        )


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array, whatever its device, autograd state or half-precision dtype."""
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if tensor.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _to_pixels(index: int, image: np.ndarray, do_rescale: bool | None, description: str) -> np.ndarray:
    """An array's values as uint8 pixels (0..255), or as they are for floats when do_rescale=False; checked."""
    kind = image.dtype.kind
    if image.dtype == np.uint8:
        return image
    if kind == "b":  # black and white, as PIL mode "1" converts to RGB
        return image.astype(np.uint8) * 255
    if kind in "iu":
        low, high = image.min(), image.max()
        if low < 0 or high > 255:
            raise ValueError(
                f"Image {index} is {description} with values in [{low}, {high}]; pixel values must lie in 0..255: "
                "scale it to uint8 first (e.g. (image / image.max() * 255).astype(np.uint8))."
            )
        return image.astype(np.uint8)
    if kind != "f":
        raise TypeError(
            f"Image {index} is {description}; pass uint8 pixels (or bool, integer or float values in 0..255)."
        )
    if not np.isfinite(image).all():
        raise ValueError(f"Image {index} is {description} with NaN or infinite values; pass finite pixel values.")
    if not do_rescale:
        return image
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"Image {index} is {description} with values in [{low:g}, {high:g}]; with do_rescale=True pixel values "
            "must lie in 0..255: clip or scale them first."
        )
    if high <= 1 and not np.array_equal(image, np.round(image)):
        raise ValueError(
            f"Image {index} is {description} with values in [{low:g}, {high:g}], but do_rescale=True reads pixels on "
            "the 0..255 scale (it would come out black); multiply it by 255, or pass do_rescale=False."
        )
    return np.round(image).astype(np.uint8)


def _standardize_image(
    index: int, image, do_convert_rgb: bool | None, do_rescale: bool | None, input_data_format: str | None
) -> tuple:
    """Check one image; bring an array or tensor to (height, width, 3) pixels, which every transformers release reads
    alike (5.17 neither expands grey arrays nor composites RGBA ones). Returns the image and its data format."""
    if isinstance(image, PIL.Image.Image):
        _check_pil_image(index, image, do_convert_rgb)
        return image, input_data_format
    description = _describe_image(image)
    if isinstance(image, torch.Tensor):
        image = _tensor_to_numpy(image)
    if image.ndim == 2:
        image = image[..., None]  # (height, width, 1): one grey image
    elif image.ndim != 3:
        raise ValueError(
            f"Image {index} is {description}; an image is (height, width), (height, width, channels) or "
            "(channels, height, width); pass several as a list or a 4-D array."
        )
    elif input_data_format is not None:  # the caller says where the channels are ("channels_first" / "channels_last")
        image = np.moveaxis(image, 0, -1) if input_data_format == "channels_first" else image
    elif image.shape[0] in CHANNEL_COUNTS:  # transformers' rule: the first axis wins when both could be channels
        image = np.moveaxis(image, 0, -1)
    elif image.shape[-1] not in CHANNEL_COUNTS:
        raise ValueError(
            f"Image {index} is {description}: neither its first nor its last axis has 1, 3 or 4 channels; "
            "pass (height, width), (height, width, C) or (C, height, width) with C in 1 (grey), 3 (RGB) or 4 (RGBA)."
        )
    image = _to_pixels(index, image, do_rescale, description)  # (height, width, channels)
    if do_convert_rgb:
        if image.shape[-1] not in CHANNEL_COUNTS:
            raise ValueError(
                f"Image {index} is {description} (channels last, as input_data_format says); RGB conversion "
                "needs 1, 3 or 4 channels."
            )
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        elif image.shape[-1] == 4:  # onto white, with transformers 5.2x's arithmetic
            white = 255 if image.dtype == np.uint8 else 1.0
            alpha = image[..., 3:4] / white
            composite = alpha * image[..., :3] + (1 - alpha) * white
            image = np.round(composite).astype(image.dtype) if white == 255 else composite.astype(image.dtype)
    return image, "channels_last"


class CheckedImageInputsMixin:
    """Reads and checks every image of a call before any is processed, for transformers' PIL image processors.

    Mixed in before a `PilBackend` image processor (`class P(CheckedImageInputsMixin, LlavaImageProcessorPil)`):
    paths, URLs and base64 strings are loaded with errors that name the image; the batch is flattened (one list per
    sample at most, 4-D arrays are batches); each image is standardized as the module docstring says, then handed to
    the backend's `process_image`.
    """

    def fetch_images(self, image_url_or_urls):
        """Load every path/URL/base64 string in a (nested) list of images; keeps the nesting and in-memory images."""
        position = 0  # flat index across the batch (a 4-D array counts as its images), the one error messages quote

        def fetch(item):
            nonlocal position
            if isinstance(item, (list, tuple)):
                return [fetch(element) for element in item]
            index = position
            position += len(item) if _is_batch(item) else 1
            if isinstance(item, str):
                return self._load_image_source(item, index)
            if not _is_valid_image(item):
                raise TypeError(
                    f"Image {index} is {_describe_image(item)}; pass a PIL image, NumPy array, torch tensor, "
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
        images = _make_flat_list_of_images(self.fetch_images(images))
        if not images:
            raise ValueError(
                "images holds no image (an empty list); pass at least one image (LlavaExtProcessor treats an empty "
                "list as no images)."
            )
        for index, image in enumerate(images):
            if _is_empty(image):
                shape = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape)
                raise ValueError(f"Image {index} is empty (shape {shape}); pass a non-empty image.")
        return images

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs) -> list:
        """Flatten the batch, check and standardize every image (see the module docstring), then `process_image` each.

        All images are checked before any is processed, so a bad one is named before the heavy work starts.
        """
        images = self._prepare_images_structure(images, expected_ndims=expected_ndims)
        do_convert_rgb, do_rescale = kwargs.get("do_convert_rgb"), kwargs.get("do_rescale")
        standardized = [
            _standardize_image(index, image, do_convert_rgb, do_rescale, kwargs.get("input_data_format"))
            for index, image in enumerate(images)
        ]
        return [
            self.process_image(image, *args, **{**kwargs, "input_data_format": data_format})
            for image, data_format in standardized
        ]


class LlavaExtImageProcessor(CheckedImageInputsMixin, LlavaImageProcessorPil):
    r"""
    LLaVA image processor: RGB conversion -> optional pad to square with the mean colour (LLaVA's `expand2square`,
    `do_pad=True`) -> resize shortest edge -> center crop -> rescale -> normalize. Defaults and outputs are those of
    transformers' [`LlavaImageProcessorPil`] (and of [`CLIPImageProcessor`] with `do_pad=False`).

    Images may be PIL images, NumPy arrays or torch tensors ((H, W), channels first or last; the module docstring lists
    the modes and dtypes read), file paths, http(s) URLs or base64 strings: a single image, a list, or a list of lists
    (one list per sample). Every image is checked before any is processed; a bad one raises a `ValueError` or
    `TypeError` naming its position in the flattened batch.

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


__all__ = ["CheckedImageInputsMixin", "LlavaExtImageProcessor", "LlavaExtImagesKwargs"]
