"""llava_ext.anyres against transformers' own anyres code: best resolution, grid, unpadding, token counts.

Expected values come from transformers' `select_best_resolution`, LLaVA-NeXT's `get_anyres_image_grid_shape`,
`image_size_to_num_patches` and `unpad_image`, and the processors' `_get_number_of_features`, called on many sizes
(including ones that are no multiple of the patch or tile size, and extreme aspect ratios, where the rounding bugs of
USERS.md #1c lived).
"""

import functools
import itertools
import types

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as reference_select_best_resolution
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from llava_ext import anyres

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 (image 336, patch 14)
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # llava-onevision (384, 14)
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # the tests' towers (image 32, patch 8)
TINY_GRID_3X3 = [[32 * i, 32 * j] for i in range(1, 4) for j in range(1, 4)]
SIDES = [1, 7, 31, 32, 33, 50, 97, 224, 336, 337, 500, 671, 1000, 1500, 3000]
SIZES = list(itertools.product(SIDES, SIDES))


def _reference_next_count(height, width, *, image_size, patch_size, pinpoints, strategy, additional):
    """`LlavaNextProcessor._get_number_of_features` (minus one for "default"), its tiles processed at `image_size`."""
    processor = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        patch_size=patch_size,
        num_additional_image_tokens=additional,
    )
    processor._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, processor)
    count = LlavaNextProcessor._get_number_of_features(processor, height, width, image_size, image_size)
    return count - int(strategy == "default")


def _reference_onevision_count(height, width, *, image_size, patch_size, pinpoints, strategy, aspect_ratio):
    processor = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_aspect_ratio=aspect_ratio,
    )
    processor._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, processor)
    count = LlavaOnevisionProcessor._get_number_of_features(processor, height, width, image_size, image_size)
    return count - int(strategy == "default")


@pytest.mark.parametrize("pinpoints", [NEXT_PINPOINTS, ONEVISION_PINPOINTS, TINY_PINPOINTS])
def test_select_best_resolution_and_grid_equal_transformers(pinpoints):
    tile = pinpoints[0][0] if pinpoints is not TINY_PINPOINTS else 32
    for size in SIZES:
        assert anyres.select_best_resolution(size, pinpoints) == tuple(reference_select_best_resolution(size, pinpoints))
        expected_grid = modeling_llava_next.get_anyres_image_grid_shape(list(size), pinpoints, tile)
        assert anyres.image_grid_shape(torch.tensor(size), pinpoints, tile) == tuple(expected_grid)
        expected_crops = modeling_llava_next.image_size_to_num_patches(list(size), pinpoints, tile)
        assert anyres.num_tiles(size, pinpoints, tile) == expected_crops


def test_unpad_image_equals_transformers():
    for (height, width), (rows, cols) in itertools.product(SIZES, [(4, 8), (8, 4), (8, 8), (12, 4), (48, 96)]):
        features = torch.randn(3, rows, cols)
        expected = modeling_llava_next.unpad_image(features, [height, width])
        got = anyres.unpad_image(features, torch.tensor([height, width]))
        assert torch.equal(got, expected), (height, width, rows, cols)
        assert anyres.unpadded_shape((height, width), rows, cols) == tuple(expected.shape[1:])


@pytest.mark.parametrize("strategy,additional", [("default", 1), ("full", 0), ("full", 1)])
@pytest.mark.parametrize("image_size,patch_size,pinpoints", [(336, 14, NEXT_PINPOINTS), (32, 8, TINY_PINPOINTS)])
def test_num_image_tokens_next_equals_processor(strategy, additional, image_size, patch_size, pinpoints):
    for height, width in SIZES:
        expected = _reference_next_count(
            height, width, image_size=image_size, patch_size=patch_size, pinpoints=pinpoints, strategy=strategy,
            additional=additional,
        )
        got = anyres.num_image_tokens_next(
            height, width, image_size=image_size, patch_size=patch_size, grid_pinpoints=pinpoints,
            vision_feature_select_strategy=strategy, num_additional_image_tokens=additional,
        )
        assert got == expected, (height, width)


@pytest.mark.parametrize("aspect_ratio", ["anyres_max_9", "anyres_max_1", "anyres_max_4"])
@pytest.mark.parametrize("strategy", ["full", "default"])
@pytest.mark.parametrize("image_size,patch_size,pinpoints", [(384, 14, ONEVISION_PINPOINTS), (32, 8, TINY_GRID_3X3)])
def test_num_image_tokens_onevision_equals_processor(aspect_ratio, strategy, image_size, patch_size, pinpoints):
    for height, width in SIZES:
        expected = _reference_onevision_count(
            height, width, image_size=image_size, patch_size=patch_size, pinpoints=pinpoints, strategy=strategy,
            aspect_ratio=aspect_ratio,
        )
        got = anyres.num_image_tokens_onevision(
            height, width, image_size=image_size, patch_size=patch_size, grid_pinpoints=pinpoints,
            vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect_ratio,
        )
        assert got == expected, (height, width)


def test_onevision_multi_image_and_video_counts_equal_processor():
    # LlavaOnevisionProcessor: an image sharing its sample gets num_image_tokens + 1 (newline); a video
    # frames * ceil(sqrt(num_image_tokens) / 2)**2 + 1
    geometry = {"image_size": 384, "patch_size": 14}
    multi = anyres.num_image_tokens_onevision(
        500, 300, **geometry, grid_pinpoints=ONEVISION_PINPOINTS, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", multi_image=True,
    )
    assert multi == 27 * 27 + 1
    assert anyres.num_video_tokens_onevision(8, **geometry) == 8 * 14 * 14 + 1
    assert anyres.num_video_tokens_onevision(3, image_size=32, patch_size=8) == 3 * 2 * 2 + 1
    assert anyres.num_video_tokens_onevision(1, image_size=40, patch_size=8) == 1 * 3 * 3 + 1  # 5 patches -> ceil 3


def test_bad_vision_aspect_ratio_and_pinpoints_name_the_fix():
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres_9'.*'anyres_max_N'"):
        anyres.max_tiles("anyres_9")
    with pytest.raises(ValueError, match=r"image_grid_pinpoints=\[\].*non-empty list"):
        anyres.select_best_resolution((10, 10), [])
