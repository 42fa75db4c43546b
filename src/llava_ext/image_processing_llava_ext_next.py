"""Image processor for LLaVA-NeXT (anyres): transformers' `LlavaNextImageProcessorPil` with llava_ext's input checks.

One image becomes a base view plus the tiles of its best grid resolution (`image_grid_pinpoints`):

    image (h x w) --+--> resize to (tile, tile) ------------------------------------------> base view
                    |
                    +--> best pinpoint (H, W) -> resize keeping aspect -> pad to (H, W) -> (H/tile) x (W/tile) tiles
                                                                                      |
    every crop: resize -> center crop (tile) -> rescale -> normalize                  v
    pixel_values (num_images, 1 + max tiles, 3, tile, tile), zero crops padding short images (do_pad)
    image_sizes  (num_images, 2): each image's original (height, width), which the token count is computed from

Pixel values equal transformers' `LlavaNextImageProcessorPil` for the same settings (the processing is inherited).
Added: every image is read and checked before any is processed, as `LlavaExtImageProcessor` does (modes, dtypes,
layouts, paths; errors name the image), `image_grid_pinpoints` must hold multiples of the tile side (the model
counts tiles by floor division, so any other size would give the processor and the model different token counts),
and a batch of different tile counts with `do_pad=False` and `return_tensors` is refused by name.

This file is copied next to checkpoints for `trust_remote_code`: it imports only names exported by the top-level
`transformers` package, the standard library, NumPy and the image processor file beside it.
"""

from transformers import BatchFeature, LlavaNextImageProcessorPil

from .image_processing_llava_ext import CheckedImageInputsMixin


def tile_side(size, crop_size) -> int:
    """The side of one crop, as transformers' anyres image processors pick it: crop height, else size height/edge."""
    if crop_size is not None and crop_size.height:
        return crop_size.height
    if size is not None and size.height:
        return size.height
    return size.shortest_edge


def check_grid_pinpoints(grid_pinpoints, tile: int) -> None:
    """`grid_pinpoints` is a non-empty list of `[height, width]` positive multiples of `tile`; raises naming the fix."""
    if not isinstance(grid_pinpoints, (list, tuple)) or not grid_pinpoints:
        raise ValueError(
            f"image_grid_pinpoints={grid_pinpoints!r} is not a non-empty list of [height, width] resolutions; pass "
            "config.image_grid_pinpoints (e.g. [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])."
        )
    for pinpoint in grid_pinpoints:
        if not (
            isinstance(pinpoint, (list, tuple))
            and len(pinpoint) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in pinpoint)
        ):
            raise ValueError(
                f"image_grid_pinpoints has {pinpoint!r}, which is not a [height, width] pair of positive ints; pass "
                "resolutions like [336, 672]."
            )
        if pinpoint[0] % tile or pinpoint[1] % tile:
            raise ValueError(
                f"image_grid_pinpoints has {list(pinpoint)}, which is not a multiple of the tile side {tile} (the "
                "crop_size, or size when no crop): the model counts tiles by floor division and would expect "
                "different image tokens than the processor makes. Use multiples of the tile side "
                f"(e.g. {[-(-side // tile) * tile for side in pinpoint]}), or the tile side the pinpoints were made "
                "for."
            )


def check_stackable(pixel_values: list, do_pad: bool, return_tensors) -> None:
    """Refuse, by name, a batch whose images have different crop counts that cannot stack into one tensor."""
    counts = [len(crops) for crops in pixel_values]
    if return_tensors is not None and not do_pad and len(set(counts)) > 1:
        raise ValueError(
            f"The images give different numbers of crops (base view + tiles: {counts}), do_pad=False, so "
            f"pixel_values cannot be one tensor (return_tensors={return_tensors!r}); pass do_pad=True (zero crops "
            "fill the short images; the model skips them by image_sizes), or return_tensors=None for a list."
        )


class LlavaExtNextImageProcessor(CheckedImageInputsMixin, LlavaNextImageProcessorPil):
    r"""
    LLaVA-NeXT image processor: each image -> a base view and the tiles of its best `image_grid_pinpoints`
    resolution, each resized, center cropped, rescaled and normalized; outputs `pixel_values` of shape
    `(num_images, 1 + max_tiles, 3, tile, tile)` (zero crops padding images with fewer tiles when `do_pad=True`) and
    `image_sizes` `(num_images, 2)`, the original `(height, width)` of each image. Defaults and outputs are those of
    transformers' [`LlavaNextImageProcessorPil`].

    Images are read as [`LlavaExtImageProcessor`] reads them (PIL in any mode RGB conversion handles, NumPy arrays or
    torch tensors (H, W) / channels first or last, paths, URLs, base64; one list per sample at most), and every image
    is checked before any is processed; a bad one raises a `ValueError` or `TypeError` naming its position.

    Args:
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            The `[height, width]` resolutions an image may be tiled at; each a multiple of the tile side (`crop_size`).
        **kwargs:
            Any [`ImagesKwargs`] (`size`, `crop_size`, `do_pad`, `image_mean`, ...), as for
            `LlavaNextImageProcessorPil`.
    """

    # llava-v1.6's preprocessor_config.json: 336 tiles, which its pinpoints are multiples of (transformers' class
    # defaults pair 224 crops with these 336-multiple pinpoints, which tile into partial crops)
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_grid_pinpoints(self.image_grid_pinpoints, tile_side(self.size, self.crop_size))

    def _preprocess(self, images, *args, **kwargs) -> BatchFeature:
        check_grid_pinpoints(kwargs["image_grid_pinpoints"], tile_side(kwargs["size"], kwargs["crop_size"]))
        do_pad, return_tensors = kwargs["do_pad"], kwargs["return_tensors"]
        outputs = super()._preprocess(images, *args, **{**kwargs, "return_tensors": None})
        check_stackable(outputs["pixel_values"], do_pad, return_tensors)
        return BatchFeature(data=dict(outputs), tensor_type=return_tensors)


__all__ = ["LlavaExtNextImageProcessor", "check_grid_pinpoints", "check_stackable", "tile_side"]
