"""LlavaExtImageProcessor against transformers' LlavaImageProcessorPil, its torch path against its PIL path, and errors."""

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
