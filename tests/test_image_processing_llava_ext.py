"""LlavaExtImageProcessor against transformers' LlavaImageProcessorPil, its torch path against its PIL path, and errors."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LlavaImageProcessorPil

from llava_ext import LlavaExtImageProcessor

SETTINGS = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: smooth gradients plus noise, so resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(3 * x + y) % 256, (2 * y + 40) % 256, (x + 2 * y) % 256], axis=-1)
    return np.clip(pixels + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)


IMAGES = {
    "rgb": lambda: PIL.Image.fromarray(photo(40, 60)),
    "grayscale L": lambda: PIL.Image.fromarray(photo(40, 60)).convert("L"),
    "rgba": lambda: PIL.Image.fromarray(np.dstack([photo(40, 60), np.linspace(0, 255, 60 * 40).reshape(40, 60)]).astype(np.uint8)),
    "1x1": lambda: PIL.Image.fromarray(photo(1, 1)),
    "very wide": lambda: PIL.Image.fromarray(photo(3, 200)),
    "very tall": lambda: PIL.Image.fromarray(photo(200, 3)),
    "numpy hwc": lambda: photo(30, 50),
    "numpy chw": lambda: np.ascontiguousarray(photo(30, 50).transpose(2, 0, 1)),
    "tensor chw": lambda: torch.from_numpy(photo(30, 50)).permute(2, 0, 1).contiguous(),
    "tensor hwc": lambda: torch.from_numpy(photo(30, 50)),
}


@pytest.mark.parametrize("do_pad", [False, True])
@pytest.mark.parametrize("kind", list(IMAGES))
def test_pil_backend_equals_transformers(kind, do_pad):
    image = IMAGES[kind]()
    expected = LlavaImageProcessorPil(**SETTINGS, do_pad=do_pad)(image, return_tensors="pt").pixel_values
    actual = LlavaExtImageProcessor(**SETTINGS, do_pad=do_pad)(image, return_tensors="pt").pixel_values
    assert actual.shape == expected.shape == (1, 3, 32, 32)
    assert (actual - expected).abs().max() <= 1e-5


def test_do_pad_fills_with_mean_colour():
    """expand2square: a wide black image padded with the mean colour, which normalizes to ~0 (not -mean/std)."""
    image = PIL.Image.new("RGB", (64, 16), (0, 0, 0))
    pixels = LlavaExtImageProcessor(**SETTINGS, do_pad=True)(image, return_tensors="pt").pixel_values[0]
    # 64x16 -> 64x64 canvas with rows 24..40 black; resized to 32: rows 0..10 are pure padding
    assert pixels[:, :10].abs().max() < 0.02
    assert pixels[:, 15].max() < -1.0  # the black band: (0 - mean) / std is about -1.5 to -1.8


@pytest.mark.parametrize("do_pad", [False, True])
def test_torch_backend_agrees_with_pil_backend(do_pad):
    images = [IMAGES[kind]() for kind in IMAGES] + [PIL.Image.fromarray(photo(40, 60, seed=s)) for s in range(4)]
    processor = LlavaExtImageProcessor(**SETTINGS, do_pad=do_pad)
    pil = processor(images, return_tensors="pt").pixel_values
    fast = processor(images, return_tensors="pt", image_backend="torch").pixel_values
    assert fast.shape == pil.shape == (len(images), 3, 32, 32)
    difference = (fast - pil).abs()
    assert difference.mean() <= 0.01
    assert difference.max() <= 0.1


def test_torch_backend_is_an_init_setting_and_saved(tmp_path):
    processor = LlavaExtImageProcessor(**SETTINGS, image_backend="torch")
    processor.save_pretrained(tmp_path)
    reloaded = LlavaExtImageProcessor.from_pretrained(tmp_path)
    assert reloaded.image_backend == "torch"
    out = reloaded([IMAGES["rgb"](), IMAGES["very tall"]()])  # no return_tensors: a list of arrays, as the reference
    assert isinstance(out.pixel_values, list) and out.pixel_values[0].shape == (3, 32, 32)


def test_unknown_backend_is_rejected():
    # transformers' typed-kwargs validation (a huggingface_hub strict-dataclass error) lists the choices
    with pytest.raises(Exception, match=r"image_backend.*expected one of \('pil', 'torch'\), got opencv"):
        LlavaExtImageProcessor(**SETTINGS)(IMAGES["rgb"](), image_backend="opencv")


def test_paths_load_like_pil_images(tmp_path):
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(photo(40, 60)).save(path)
    processor = LlavaExtImageProcessor(**SETTINGS)
    from_path = processor(str(path), return_tensors="pt").pixel_values
    from_image = processor(PIL.Image.open(path), return_tensors="pt").pixel_values
    assert torch.equal(from_path, from_image)


def test_missing_file_names_index_and_path(tmp_path):
    good = tmp_path / "good.png"
    PIL.Image.fromarray(photo(8, 8)).save(good)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match=r"Image 1 \('.*nope\.jpg'\) is not an existing file"):
        LlavaExtImageProcessor(**SETTINGS)([str(good), str(missing)])


def test_unreadable_file_names_index_and_path(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"Image 0 \('.*broken\.png'\) could not be read as an image"):
        LlavaExtImageProcessor(**SETTINGS)([str(broken)])


def test_zero_sized_images_are_named():
    processor = LlavaExtImageProcessor(**SETTINGS)
    with pytest.raises(ValueError, match=r"Image 2 is empty \(shape \(0, 5, 3\)\)"):
        processor([photo(8, 8), photo(8, 8), np.zeros((0, 5, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"Image 0 is empty"):
        processor(PIL.Image.new("RGB", (0, 0)), image_backend="torch")


# Every kind of image the processor reads, and how each unreadable one is named (tests/test_fuzz.py draws thousands)


def truncated_png() -> PIL.Image.Image:
    """A PNG whose file is cut in half: it opens (the header is there) but does not decode."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(photo(16, 16)).save(buffer, "PNG")
    return PIL.Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))


@pytest.mark.parametrize(
    "images, error, message",
    [
        (PIL.Image.new("La", (20, 12)), ValueError, r"Image 0 is a 20x12 PIL image in mode 'La', which PIL cannot "
                                                    r"convert to RGB; convert it yourself first"),
        ([photo(8, 8), truncated_png()], ValueError, r"Image 1 \(a 16x16 PIL image in mode 'RGB'\) could not be "
                                                     r"decoded \(OSError: image file is truncated"),
        ([photo(8, 8), np.zeros(12, np.uint8)], ValueError, r"Image 1 is a uint8 array of shape \(12,\); an image is "
                                                            r"\(height, width\), \(height, width, channels\)"),
        (np.zeros((5, 12, 20), np.uint8), ValueError, r"Image 0 is a uint8 array of shape \(5, 12, 20\): neither its "
                                                      r"first nor its last axis has 1, 3 or 4 channels"),
        (np.full((8, 8, 3), -3, np.int16), ValueError, r"Image 0 is an int16 array of shape \(8, 8, 3\) with values "
                                                       r"in \[-3, -3\]; pixel values must lie in 0..255"),
        (np.zeros((8, 8, 3), np.complex64), TypeError, r"Image 0 is a complex64 array of shape \(8, 8, 3\); pass "
                                                       r"uint8 pixels"),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, r"Image 0 is a float32 array .* with NaN or infinite"),
        (np.full((8, 8, 3), 300.0), ValueError, r"Image 0 is a float64 array of shape \(8, 8, 3\) with values in "
                                                r"\[300, 300\]; with do_rescale=True pixel values must lie in 0..255"),
        (torch.full((3, 8, 8), 0.5), ValueError, r"Image 0 is a torch.float32 tensor of shape \(3, 8, 8\) with "
                                                 r"values in \[0.5, 0.5\], but do_rescale=True reads pixels on the "
                                                 r"0..255 scale .* or pass do_rescale=False"),
        ([[[photo(8, 8)]]], ValueError, r"images is nested more than two lists deep \(\[\[\[a uint8 array of shape "
                                        r"\(8, 8, 3\)\]\]\]\)"),
        ([photo(8, 8), [photo(8, 8)]], ValueError, r"images mixes images and lists at the top level"),
        ([[], []], ValueError, r"images holds no image \(an empty list\); pass at least one image"),
    ],
    ids=["La mode", "truncated file", "1-D", "5 channels", "negative int", "complex", "NaN", "over 255", "[0, 1]",
         "three lists deep", "mixed nesting", "no image"],
)
@pytest.mark.parametrize("backend", ["pil", "torch"])
def test_unreadable_images_are_named(images, error, message, backend):
    with pytest.raises(error, match=message):
        LlavaExtImageProcessor(**SETTINGS)(images, image_backend=backend)


def test_channels_last_with_other_channel_counts_is_named():
    with pytest.raises(ValueError, match=r"Image 0 is a uint8 array of shape \(8, 8, 5\) \(channels last, as "
                                         r"input_data_format says\); RGB conversion needs 1, 3 or 4 channels"):
        LlavaExtImageProcessor(**SETTINGS)(np.zeros((8, 8, 5), np.uint8), input_data_format="channels_last")


GREY = photo(30, 50)[..., 0]  # (30, 50) uint8
SAME_PIXELS = {  # each is read as the PIL image beside it, on every transformers release and both backends
    "grey (H, W)": (GREY, PIL.Image.fromarray(GREY)),
    "grey (H, W, 1)": (GREY[..., None], PIL.Image.fromarray(GREY)),
    "grey (1, H, W) tensor": (torch.from_numpy(GREY)[None], PIL.Image.fromarray(GREY)),
    "bool as black and white": (GREY > 128, PIL.Image.fromarray(GREY > 128).convert("1")),
    "int16 pixels": (photo(30, 50).astype(np.int16), PIL.Image.fromarray(photo(30, 50))),
    "float 0..255, rounded": (photo(30, 50) + 0.3, PIL.Image.fromarray(photo(30, 50))),
    "bfloat16 tensor needing grad": (torch.from_numpy(photo(30, 50)).bfloat16().requires_grad_(),
                                     PIL.Image.fromarray(photo(30, 50))),
    "transparent RGBA array onto white": (np.dstack([photo(30, 50), np.zeros((30, 50), np.uint8)]),
                                          PIL.Image.new("RGB", (50, 30), (255, 255, 255))),
}


@pytest.mark.parametrize("backend", ["pil", "torch"])
@pytest.mark.parametrize("kind", list(SAME_PIXELS))
def test_arrays_and_tensors_read_as_the_pil_image_they_show(kind, backend):
    array, image = SAME_PIXELS[kind]
    processor = LlavaExtImageProcessor(**SETTINGS)
    expected = processor(image, return_tensors="pt", image_backend=backend).pixel_values
    actual = processor(array, return_tensors="pt", image_backend=backend).pixel_values
    assert actual.shape == expected.shape == (1, 3, 32, 32)
    assert torch.equal(actual, expected)


def test_an_animated_gif_is_read_at_its_current_frame():
    frames = [PIL.Image.new("RGB", (20, 12), colour).convert("P") for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    gif = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    gif.seek(1)
    processor = LlavaExtImageProcessor(**SETTINGS)
    out = processor(gif, return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 32)
    assert torch.equal(out, processor(PIL.Image.new("RGB", (20, 12), (0, 0, 255)), return_tensors="pt").pixel_values)


def test_floats_are_left_alone_when_do_rescale_is_false():
    pixels = photo(30, 50).astype(np.float32) / 255  # [0, 1] floats: what do_rescale=False is for
    processor = LlavaExtImageProcessor(**SETTINGS)
    out = processor(pixels, do_rescale=False, return_tensors="pt").pixel_values
    expected = processor(photo(30, 50), return_tensors="pt").pixel_values
    assert (out - expected).abs().max() < 0.02  # PIL resizes [0, 1] floats through uint8 either way
