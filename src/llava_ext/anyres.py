"""Anyres geometry of LLaVA-NeXT and LLaVA-OneVision: tile grids, unpadding and the image-token count.

One image becomes a base view (the whole image resized to the tower's `image_size`) plus a grid of tiles cut from the
image resized and padded to the best of `image_grid_pinpoints`. The model lays the tiles' patch features out as one
feature map, cuts the padding off again, appends `image_newline` to every row, and puts the base view first:

    tiles (rows x cols, each p x p patches)      unpadded map (h' x w')          tokens
    +----+----+                                  +---------+--+               base view: p*p (+CLS, -1 if "default")
    | t1 | t2 |  -> one (rows*p) x (cols*p) map -> | image   |\n|  -> flatten ->  then h' rows of w' features + newline
    +----+----+     padding rows/cols dropped      +---------+--+
    | t3 | t4 |
    +----+----+   (OneVision: a map above anyres_max_N tiles' worth is bilinearly shrunk first)

The token count is a pure function of the original image size and the config, so the processor (which expands each
`<image>`) and the model (which checks the count before its vision tower runs) call the same function here and agree
by construction. Every rounding step below is the one transformers' LLaVA-NeXT / OneVision model applies to the
features (`unpad_image`, the anyres_max interpolation size); the counts equal what transformers' processors compute.

This file is copied next to checkpoints for `trust_remote_code`: it imports only torch and the standard library.
"""

import math
import re
from collections.abc import Sequence

import torch

VISION_ASPECT_RATIO_PATTERN = re.compile(r"anyres_max_(\d+)")


def _as_size(size) -> tuple[int, int]:
    """`(height, width)` as Python ints, from a tuple, list, tensor or array (a tensor would compare elementwise)."""
    if hasattr(size, "tolist"):
        size = size.tolist()
    height, width = size
    return int(height), int(width)


def select_best_resolution(original_size: tuple[int, int], possible_resolutions: list) -> tuple[int, int]:
    """The `(height, width)` in `possible_resolutions` that keeps the most of the image, then wastes the least.

    Same result as transformers' `image_processing_utils.select_best_resolution` (5.17-5.25): the image is scaled to
    fit each candidate keeping its aspect ratio; the candidate with the largest effective (kept) area wins, ties going
    to the smallest padded area. Kept here so that the rule a checkpoint was processed with ships with it.

    Args:
        original_size (`tuple[int, int]`): the image's `(height, width)`.
        possible_resolutions (`list`): candidate `(height, width)` pairs, e.g. `config.image_grid_pinpoints`.
    """
    original_height, original_width = _as_size(original_size)
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best_fit, max_effective, min_wasted = (int(height), int(width)), effective, wasted
    if best_fit is None:
        raise ValueError(
            f"image_grid_pinpoints={possible_resolutions!r} has no resolution to tile a "
            f"{original_height}x{original_width} image into; give a non-empty list of [height, width] pairs."
        )
    return best_fit


def image_grid_shape(image_size: tuple[int, int], grid_pinpoints: list, patch_size: int) -> tuple[int, int]:
    """`(rows, cols)` of `patch_size` squares covering the best resolution for an image of `image_size` `(h, w)`.

    With `patch_size` the tower's `image_size` (the tile side) this is the tile grid, as transformers'
    `get_anyres_image_grid_shape`; with the tower's patch size it is the grid of patch features.
    """
    height, width = select_best_resolution(_as_size(image_size), grid_pinpoints)
    return height // patch_size, width // patch_size


def num_tiles(image_size: tuple[int, int], grid_pinpoints: list, tile_size: int) -> int:
    """Crops one anyres image yields: the tiles of its best resolution (ceil division) plus the base view."""
    height, width = select_best_resolution(_as_size(image_size), grid_pinpoints)
    return math.ceil(height / tile_size) * math.ceil(width / tile_size) + 1


def _unpadded_extent(original_size: tuple[int, int], current_height: int, current_width: int) -> tuple[int, int, int]:
    """`(axis, start, stop)` of the unpadded region of a `current_height` x `current_width` map; axis 0 = rows."""
    original_height, original_width = _as_size(original_size)
    if original_width / original_height > current_width / current_height:  # wider than the map: rows were padded
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return 0, padding, current_height - padding
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return 1, padding, current_width - padding


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Cut the padding the image processor added (to fit the best resolution) off a feature map.

    Args:
        tensor (`torch.Tensor` of shape `(channels, height, width)`): the tiles' features laid out as one map.
        original_size (`tuple[int, int]`): the image's `(height, width)` before processing.

    Returns:
        `torch.Tensor` of shape `(channels, unpadded_height, unpadded_width)`, the same slice as transformers'
        `unpad_image`.
    """
    axis, start, stop = _unpadded_extent(original_size, *tensor.shape[1:])
    return tensor[:, start:stop, :] if axis == 0 else tensor[:, :, start:stop]


def unpadded_shape(original_size: tuple[int, int], current_height: int, current_width: int) -> tuple[int, int]:
    """The `(height, width)` `unpad_image` leaves of a `current_height` x `current_width` map."""
    axis, start, stop = _unpadded_extent(original_size, current_height, current_width)
    return (stop - start, current_width) if axis == 0 else (current_height, stop - start)


def max_tiles(vision_aspect_ratio: str) -> int:
    """N of `"anyres_max_N"`: how many tiles' worth of features OneVision keeps before shrinking the map."""
    match = VISION_ASPECT_RATIO_PATTERN.fullmatch(str(vision_aspect_ratio))
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported; use 'anyres_max_N' with N >= 1 the most "
            "tiles' worth of features one image keeps (OneVision checkpoints use 'anyres_max_9')."
        )
    return int(match.group(1))


def anyres_max_shape(height: int, width: int, patches_per_side: int, vision_aspect_ratio: str) -> tuple[int, int]:
    """The `(height, width)` OneVision shrinks an unpadded `height` x `width` map to (unchanged if small enough).

    A map more than 1.1x (per side) above `N * patches_per_side**2` features is bilinearly resized by that ratio;
    the sizes are floored as transformers' LlavaOnevisionModel floors them.
    """
    ratio = math.sqrt(height * width / (max_tiles(vision_aspect_ratio) * patches_per_side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def _tile_map_shape(height, width, image_size, patch_size, grid_pinpoints) -> tuple[int, int, int]:
    """Patches per tile side, and the unpadded feature map's `(rows, cols)` for an image of `height` x `width`."""
    patches_per_side = image_size // patch_size
    rows, cols = image_grid_shape((height, width), grid_pinpoints, image_size)
    return (patches_per_side, *unpadded_shape((height, width), rows * patches_per_side, cols * patches_per_side))


def _base_tokens(patches_per_side, num_additional_image_tokens, vision_feature_select_strategy) -> int:
    """Features of the base view: one per patch, + CLS where the tower has one, - position 0 for "default"."""
    return patches_per_side**2 + num_additional_image_tokens - int(vision_feature_select_strategy == "default")


def num_image_tokens_next(
    height: int,
    width: int,
    *,
    image_size: int,
    patch_size: int,
    grid_pinpoints: Sequence,
    vision_feature_select_strategy: str,
    num_additional_image_tokens: int = 1,
) -> int:
    """Placeholder tokens one LLaVA-NeXT image of `height` x `width` (original size) expands to.

    Equals `LlavaNextProcessor._get_number_of_features` (minus one for `"default"`) and the features
    `LlavaNextModel` produces: the base view, then the unpadded tile map's rows, each with one `image_newline`.

    Args:
        height (`int`), width (`int`): the image's size before processing (`image_sizes` in the model's inputs).
        image_size (`int`): the tower's input side, which is the tile side (`vision_config.image_size`).
        patch_size (`int`): the tower's patch side (`vision_config.patch_size`).
        grid_pinpoints (`list`): `config.image_grid_pinpoints`.
        vision_feature_select_strategy (`str`): `"default"` drops the first token of each crop, `"full"` keeps it.
        num_additional_image_tokens (`int`, *optional*, defaults to 1): tokens the tower adds besides the patches
            (1 for CLIP's CLS, 0 for SigLIP).
    """
    patches_per_side, rows, cols = _tile_map_shape(height, width, image_size, patch_size, grid_pinpoints)
    base = _base_tokens(patches_per_side, num_additional_image_tokens, vision_feature_select_strategy)
    return base + rows * (cols + 1)


def num_image_tokens_onevision(
    height: int,
    width: int,
    *,
    image_size: int,
    patch_size: int,
    grid_pinpoints: Sequence,
    vision_feature_select_strategy: str,
    vision_aspect_ratio: str,
    num_additional_image_tokens: int = 0,
    multi_image: bool = False,
) -> int:
    """Placeholder tokens one LLaVA-OneVision image of `height` x `width` (original size) expands to.

    Equals `LlavaOnevisionProcessor`'s count and the features `LlavaOnevisionModel` produces. A single image is
    NeXT's layout with the tile map shrunk to at most N tiles' worth (`vision_aspect_ratio="anyres_max_N"`); an image
    sharing its sample with others (`multi_image=True`) is its base view and one `image_newline`.

    Args:
        height (`int`), width (`int`): the image's size before processing.
        image_size (`int`), patch_size (`int`), grid_pinpoints (`list`), vision_feature_select_strategy (`str`): as
            for `num_image_tokens_next`.
        vision_aspect_ratio (`str`): `config.vision_aspect_ratio`, e.g. `"anyres_max_9"`.
        num_additional_image_tokens (`int`, *optional*, defaults to 0): tokens the tower adds besides the patches
            (0 for SigLIP, OneVision's tower; 1 for CLIP's CLS).
        multi_image (`bool`, *optional*, defaults to `False`): the sample holds more than one image.
    """
    patches_per_side = image_size // patch_size
    base = _base_tokens(patches_per_side, num_additional_image_tokens, vision_feature_select_strategy)
    if multi_image:
        return base + 1
    patches_per_side, rows, cols = _tile_map_shape(height, width, image_size, patch_size, grid_pinpoints)
    rows, cols = anyres_max_shape(rows, cols, patches_per_side, vision_aspect_ratio)
    return base + rows * (cols + 1)


def pooled_frame_side(image_size: int, patch_size: int) -> int:
    """Side of one video frame's feature map after OneVision's 2x bilinear pooling (ceil, as the model's)."""
    return math.ceil((image_size // patch_size) / 2)


def num_video_tokens_onevision(num_frames: int, *, image_size: int, patch_size: int) -> int:
    """Placeholder tokens one LLaVA-OneVision video of `num_frames` frames expands to.

    Each frame's `p x p` patch features are pooled to `ceil(p/2) x ceil(p/2)`; one `image_newline` ends the video.
    Equals `LlavaOnevisionProcessor`'s video count.

    Args:
        num_frames (`int`): frames in the video (after the video processor's sampling).
        image_size (`int`): the tower's input side (`vision_config.image_size`).
        patch_size (`int`): the tower's patch side (`vision_config.patch_size`).
    """
    return num_frames * pooled_frame_side(image_size, patch_size) ** 2 + 1


__all__ = [
    "anyres_max_shape",
    "image_grid_shape",
    "max_tiles",
    "num_image_tokens_next",
    "num_image_tokens_onevision",
    "num_tiles",
    "num_video_tokens_onevision",
    "pooled_frame_side",
    "select_best_resolution",
    "unpad_image",
    "unpadded_shape",
]
