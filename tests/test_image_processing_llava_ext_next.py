"""LlavaExtNextImageProcessor and LlavaExtOnevisionImageProcessor against transformers' PIL anyres image processors,
their input checks, and OneVision's video frames against transformers' plain PIL pipeline."""

import numpy as np
import PIL.Image
import pytest
import torch
from test_image_processing_llava_ext import IMAGES, photo
from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil
from transformers.image_processing_utils import select_best_resolution

from llava_ext.image_processing_llava_ext_next import LlavaExtNextImageProcessor
from llava_ext.image_processing_llava_ext_onevision import LlavaExtOnevisionImageProcessor

TILE = 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # llava-v1.6's five, at a 32-pixel tile
NEXT = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
ONEVISION = dict(  # OneVision's 6x6 grid of 384-multiples, as a 3x3 grid of 32-multiples
    size={"height": TILE, "width": TILE}, image_grid_pinpoints=[[h, w] for h in (32, 64, 96) for w in (32, 64, 96)]
)
PAIRS = {
    "next": (LlavaNextImageProcessorPil, LlavaExtNextImageProcessor, NEXT),
    "onevision": (LlavaOnevisionImageProcessorPil, LlavaExtOnevisionImageProcessor, ONEVISION),
}
# (height, width): multiples of the tile, not multiples of the tile or of 8, thin, tiny and larger than every pinpoint
SIZES = [(32, 64), (40, 60), (33, 31), (17, 100), (100, 17), (64, 64), (7, 5), (150, 97), (250, 250)]


def process(cls, settings, images, **kwargs):
    return cls(**settings)(images, return_tensors="pt", **kwargs)


def assert_equal_outputs(actual, expected):
    assert set(actual.keys()) == set(expected.keys())
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("model", list(PAIRS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_equals_transformers_per_size(model, size):
    reference, ours, settings = PAIRS[model]
    image = PIL.Image.fromarray(photo(*size))
    expected = process(reference, settings, image)
    actual = process(ours, settings, image)
    assert_equal_outputs(actual, expected)
    assert actual["image_sizes"].tolist() == [list(size)]
    assert actual["pixel_values"].shape[-3:] == (3, TILE, TILE)


@pytest.mark.parametrize("model", list(PAIRS))
@pytest.mark.parametrize("kind", list(IMAGES))
def test_equals_transformers_per_input_kind(model, kind):
    """Grey, RGBA, 1x1, very thin, NumPy and torch inputs (channels first and last), as the 1.5 processor reads them."""
    reference, ours, settings = PAIRS[model]
    assert_equal_outputs(process(ours, settings, IMAGES[kind]()), process(reference, settings, IMAGES[kind]()))


@pytest.mark.parametrize("model", list(PAIRS))
def test_mixed_sizes_batch_pads_crops_and_equals_transformers(model):
    """Different crop counts in one batch: zero crops fill the short images, image_sizes keeps each size (#11)."""
    reference, ours, settings = PAIRS[model]
    sizes = [(32, 64), (64, 64), (17, 100), (40, 60)]
    images = [PIL.Image.fromarray(photo(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    expected, actual = process(reference, settings, images), process(ours, settings, images)
    assert_equal_outputs(actual, expected)
    pinpoints = settings["image_grid_pinpoints"]
    crops = [  # 1 base view + the tiles of the best pinpoint, by transformers' rule
        1 + (best[0] // TILE) * (best[1] // TILE) for best in (select_best_resolution(s, pinpoints) for s in sizes)
    ]
    assert len(set(crops)) > 1
    for index, count in enumerate(crops):
        assert actual["pixel_values"][index, :count].abs().amax(dim=(1, 2, 3)).min() > 0  # real crops
        assert not actual["pixel_values"][index, count:].any()  # the padding crops are zeros
    assert actual["image_sizes"].tolist() == [list(size) for size in sizes]


def test_onevision_multi_image_samples_equal_transformers():
    """A sample's list with several images: each padded to a square, one crop; batch_num_images per sample."""
    images = [PIL.Image.fromarray(photo(h, w, seed=i)) for i, (h, w) in enumerate([(40, 60), (17, 100), (64, 64)])]
    batch = [[images[0]], images[1:]]
    expected = process(LlavaOnevisionImageProcessorPil, ONEVISION, batch)
    actual = process(LlavaExtOnevisionImageProcessor, ONEVISION, batch)
    assert_equal_outputs(actual, expected)
    assert actual["batch_num_images"].tolist() == [1, 2]
    assert not actual["pixel_values"][1:, 1:].any()  # the multi-image sample's images are one crop each


def test_onevision_counts_images_after_flattening():
    """A text-only sample's empty list counts nothing, a 4-D array counts its images (transformers: 1 per list item)."""
    image = PIL.Image.fromarray(photo(40, 60))
    batch = [[image], [], [image, image]]
    assert process(LlavaExtOnevisionImageProcessor, ONEVISION, batch)["batch_num_images"].tolist() == [1, 2]
    stacked = np.stack([photo(40, 60, seed=s) for s in range(3)])  # (3, height, width, 3): three images
    outputs = process(LlavaExtOnevisionImageProcessor, ONEVISION, [stacked])
    assert outputs["batch_num_images"].tolist() == [1, 1, 1]
    assert outputs["pixel_values"].shape[0] == 3


@pytest.mark.parametrize(
    "video",
    [
        lambda: [PIL.Image.fromarray(photo(40, 60, seed=s)) for s in range(4)],
        lambda: np.stack([photo(40, 60, seed=s) for s in range(4)]),
        lambda: torch.from_numpy(np.stack([photo(40, 60, seed=s) for s in range(4)])),
    ],
    ids=["pil frames", "numpy (frames, h, w, c)", "tensor (frames, h, w, c)"],
)
def test_video_frames_equal_transformers_plain_resize(video):
    """Each frame resized to size (no tiles, no square padding), rescaled, normalized: LlavaImageProcessorPil's path."""
    frames = [PIL.Image.fromarray(photo(40, 60, seed=s)) for s in range(4)]
    expected = LlavaImageProcessorPil(size={"height": TILE, "width": TILE}, do_center_crop=False)(
        frames, return_tensors="pt"
    ).pixel_values
    actual = LlavaExtOnevisionImageProcessor(**ONEVISION).preprocess_videos(video(), return_tensors="pt")
    assert actual["pixel_values_videos"].shape == (1, 4, 3, TILE, TILE)
    assert torch.equal(actual["pixel_values_videos"][0], expected)


def test_videos_as_a_batch_and_per_sample_lists():
    processor = LlavaExtOnevisionImageProcessor(**ONEVISION)
    short, long = np.stack([photo(40, 60)] * 2), np.stack([photo(40, 60)] * 5)
    assert processor.preprocess_videos([[short], [], [long]])["pixel_values_videos"][1].shape == (5, 3, TILE, TILE)
    assert processor.preprocess_videos(np.stack([short, short]), return_tensors="pt")["pixel_values_videos"].shape == (
        2, 2, 3, TILE, TILE,
    )
    with pytest.raises(ValueError, match=r"different frame counts or sizes .*sample the same number of frames"):
        processor.preprocess_videos([short, long], return_tensors="pt")
    with pytest.raises(ValueError, match=r"videos is .*a 4-D array \(frames, height, width, channels\)"):
        processor.preprocess_videos([short, "not a video", 3])


@pytest.mark.parametrize("model", list(PAIRS))
def test_bad_images_are_named_before_processing(model, tmp_path):
    _, ours, settings = PAIRS[model]
    processor = ours(**settings)
    good = PIL.Image.fromarray(photo(40, 60))
    with pytest.raises(ValueError, match=r"Image 1 \('.*missing.png'\) is not an existing file"):
        processor([good, str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"Image 1 is a float32 array .* values in \[0.5, 0.5\].*multiply it by 255"):
        processor([good, np.full((20, 30, 3), 0.5, dtype=np.float32)])
    with pytest.raises(ValueError, match=r"images holds no image \(an empty list\)"):
        processor([])


@pytest.mark.parametrize("model", list(PAIRS))
@pytest.mark.parametrize(
    "pinpoints, message",
    [
        ([[32, 48]], r"\[32, 48\], which is not a multiple of the tile side 32 .*\(e.g. \[32, 64\]\)"),
        ([[32, 0]], r"\[32, 0\], which is not a \[height, width\] pair of positive ints"),
        ([], r"image_grid_pinpoints=\[\] is not a non-empty list"),
    ],
)
def test_pinpoints_must_tile_exactly(model, pinpoints, message):
    """Pinpoints off the tile grid: the processor would cut partial tiles the model's floor division does not count."""
    _, ours, settings = PAIRS[model]
    with pytest.raises(ValueError, match=message):
        ours(**{**settings, "image_grid_pinpoints": pinpoints})
    with pytest.raises(ValueError, match=message):  # per call too
        ours(**settings)(PIL.Image.fromarray(photo(40, 60)), image_grid_pinpoints=pinpoints)


@pytest.mark.parametrize("model", list(PAIRS))
def test_unpadded_mixed_batch_is_refused_by_name(model):
    _, ours, settings = PAIRS[model]
    images = [PIL.Image.fromarray(photo(32, 64)), PIL.Image.fromarray(photo(64, 64))]
    with pytest.raises(ValueError, match=r"different numbers of crops \(base view \+ tiles: \[3, 5\]\), do_pad=False"):
        ours(**settings)(images, do_pad=False, return_tensors="pt")
    unpadded = ours(**settings)(images, do_pad=False)  # a list of per-image arrays is fine
    assert [crops.shape[0] for crops in unpadded["pixel_values"]] == [3, 5]


def test_next_defaults_are_llava_v1_6s(tmp_path):
    """336 tiles with llava-v1.6's pinpoints; saved and reloaded with the settings."""
    processor = LlavaExtNextImageProcessor()
    assert processor.crop_size.height == 336 and processor.size.shortest_edge == 336
    assert processor.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    LlavaExtNextImageProcessor(**NEXT).save_pretrained(tmp_path)
    reloaded = LlavaExtNextImageProcessor.from_pretrained(tmp_path)
    assert reloaded.image_grid_pinpoints == PINPOINTS and reloaded.crop_size.height == TILE
