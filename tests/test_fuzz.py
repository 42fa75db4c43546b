"""Property tests (hypothesis) for the processor, the image processor (both backends) and the collator.

The property, for every input drawn here: the call either works -- one (3, crop, crop) `pixel_values` entry per image
and exactly images x tokens-per-image `<image>` tokens in `input_ids` (labels on assistant answers only, for the
collator) -- or it raises a `ValueError` / `TypeError` whose message names the bad input: the image's position and its
mode, dtype or shape, the counts that disagree, the sample's id. Never an IndexError, KeyError, AttributeError or
RuntimeError from inside NumPy, PIL or torch, and never past a deadline.

What each input must do is worked out here from the input alone (the documented image rules, the marker counts, a
character-level tokenization of the rendered text), so a check that is too strict fails as surely as a crash.

The default run (CI) draws a few hundred examples in total; `pytest -m slow tests/test_fuzz.py` draws over 10,000.
"""

import contextlib
import io
import re
import signal
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    BOS_ID, EOS_ID, HANG_GUARD_S, IMAGE_TOKEN_ID, PAD_ID, build_tiny_tokenizer, needs_image_assistant_masks,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_ext.data import IGNORE_INDEX, LlavaExtDataCollator, SampleError
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor
from llava_ext.processing_llava_ext import LlavaExtProcessor

# Examples per property: (default run, slow run). Default total 390, slow total 10,700.
EXAMPLES = {
    "image_processor": (130, 4000),
    "backends_agree": (50, 1200),
    "extreme_sizes": (6, 300),
    "processor": (110, 3000),
    "collator_text": (40, 700),
    "collator_images": (54, 1500),
}
HANG_S = HANG_GUARD_S  # a hard per-example limit (SIGALRM): a hang fails the test instead of stalling CI; no deadline
BUDGETS = [pytest.param("default", id="default"), pytest.param("slow", id="slow", marks=pytest.mark.slow)]


def fuzz_settings(budget: str, name: str) -> settings:
    default = budget == "default"
    return settings(
        max_examples=EXAMPLES[name][0 if default else 1],
        deadline=None,  # a slow or shared machine is not a failure; hard_time_limit catches hangs
        database=None,  # nothing written into the repository
        derandomize=default,  # CI sees the same examples every run; the slow run explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


class ExampleTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def hard_time_limit(seconds: float = HANG_S):
    """Interrupt an example that runs past `seconds` (hypothesis' deadline only reports one after it ends)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise ExampleTimeout(f"example ran past {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def weighted(*choices):
    """`st.one_of` with weights: `weighted((3, a), (1, b))` draws `a` three times as often; shrinks towards `a`."""
    total = sum(weight for weight, _ in choices)

    def pick(number):
        for weight, strategy in choices:
            if number < weight:
                return strategy
            number -= weight

    return st.integers(0, total - 1).flatmap(pick)


class Tally(Counter):
    """How many examples worked and how many were refused; a property test checks that both paths ran."""

    def __str__(self) -> str:
        return f"{sum(self.values())} examples: {self['works']} worked, {self['refused']} refused"


def assert_names_a_problem(error: BaseException, problems: list[str]) -> None:
    """A raised error is a ValueError/TypeError whose message matches one of the input's problems (regexes)."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__} from deep inside: {error}"
    assert problems, f"a valid input raised {type(error).__name__}: {error}"
    assert any(re.search(problem, str(error), re.DOTALL) for problem in problems), (
        f"the message does not name the bad input.\nmessage: {error}\nexpected one of: {problems}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Images: what to build, and what it must do (the rules in image_processing_llava_ext's module docstring)

PIL_MODES = ("RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "La")  # 'La': PIL cannot convert it
CHANNELS = (1, 3, 4)


def photo(rng, height: int, width: int, channels: int) -> np.ndarray:
    """(height, width, channels) uint8 like a photo: smooth gradients plus noise (tests/test_image_processing's)."""
    y, x = np.mgrid[0:height, 0:width]
    planes = [(3 * x + y) % 256, (2 * y + 40) % 256, (x + 2 * y) % 256, 255 - (x + y) % 128]
    pixels = np.stack(planes[:channels], axis=-1) + rng.normal(0, 12, size=(height, width, channels))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageSpec:
    """One test image: `build()` makes it; `problem(index, image)` is the error it must raise (a regex) or None."""

    kind: str  # "numpy", "torch", "pil", "gif" (animated), "truncated" (a PNG cut in half), "none"
    height: int
    width: int
    seed: int
    mode: str = "RGB"  # PIL images
    dtype: str = "uint8"  # arrays and tensors
    layout: str = "hwc"  # "hw", "hwc", "chw"
    channels: int = 3
    # "pixels" (random 0..255), "photo" (smooth, as photos), "fractional", "unit" ([0, 1)), "negative", "above", "nan"
    values: str = "pixels"
    requires_grad: bool = False

    def build(self):
        rng = np.random.default_rng(self.seed)
        if self.kind == "none":
            return None
        if self.kind in ("pil", "gif", "truncated"):
            return self._build_pil(rng)
        pixels = self._pixels(rng, (self.height, self.width, self.channels))  # (height, width, channels)
        array = {"hw": pixels[..., 0], "hwc": pixels, "chw": np.moveaxis(pixels, -1, 0)}[self.layout]
        array = np.ascontiguousarray(array.astype(np.float32 if self.dtype in ("bfloat16", "float16") else self.dtype))
        if self.kind == "numpy":
            return array
        tensor = torch.from_numpy(array)
        if self.dtype in ("bfloat16", "float16"):
            tensor = tensor.to(getattr(torch, self.dtype))
        return tensor.requires_grad_() if self.requires_grad and tensor.is_floating_point() else tensor

    def _pixels(self, rng, shape) -> np.ndarray:
        """(height, width, channels) values as `values` says, float64 (bool for a bool image)."""
        if self.dtype == "bool":
            return rng.integers(0, 2, shape).astype(bool)
        if self.values == "photo":
            return photo(rng, *shape).astype(np.float64)
        if self.values == "fractional":
            array = rng.uniform(0, 255, shape)
        elif self.values == "unit":
            array = rng.random(shape)
        else:
            array = rng.integers(0, 256, shape).astype(np.float64)
        if array.size and self.values in ("negative", "above", "nan"):
            array.flat[int(rng.integers(array.size))] = {"negative": -1.0 - rng.integers(300), "nan": np.nan,
                                                          "above": 256.0 + rng.integers(300)}[self.values]
        return array

    def _build_pil(self, rng):
        size = (self.width, self.height)
        rgb = photo(rng, self.height, self.width, 3) if self.values == "photo" else rng.integers(
            0, 256, (self.height, self.width, 3), dtype=np.uint8)
        if self.kind == "truncated":
            buffer = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8)).save(buffer, "PNG")
            return PIL.Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))
        if self.kind == "gif":
            noise = rng.integers(0, 256, (3, self.height, self.width, 3), dtype=np.uint8)
            frames = [PIL.Image.fromarray(frame).convert("P") for frame in noise]
            buffer = io.BytesIO()
            frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
            image = PIL.Image.open(io.BytesIO(buffer.getvalue()))
            image.seek(int(rng.integers(image.n_frames)))  # the current frame is the one read
            return image
        if 0 in size or self.mode == "La":
            return PIL.Image.new(self.mode, size)
        grey = rgb[..., 0].astype(np.int64)
        if self.mode == "I;16":  # 0..255 values: PIL's conversion to RGB clips 16-bit values, it does not scale them
            return PIL.Image.fromarray(grey.astype(np.uint16))
        if self.mode in ("I", "F"):
            return PIL.Image.fromarray(grey.astype(np.int32 if self.mode == "I" else np.float32))
        return PIL.Image.fromarray(rgb).convert(self.mode)

    def problem(self, index: int, image) -> str | None:
        """The error this image must raise at flat position `index`, as a regex; None when it must work."""
        name = rf"Image {index}\b"
        if image is None:
            return rf"{name} is a NoneType"
        if isinstance(image, PIL.Image.Image):
            if 0 in image.size:
                return rf"{name} is empty"
            if self.kind == "truncated":
                return rf"{name} \(.*PIL image.*\) could not be decoded"
            return rf"{name} is .*mode 'La', which PIL cannot convert to RGB" if image.mode == "La" else None
        shape = tuple(image.shape)
        if 0 in shape:
            return rf"{name} is empty \(shape {re.escape(str(shape))}\)"
        described = rf"{name} is an? (torch\.)?{re.escape(self.dtype)} (array|tensor) of shape {re.escape(str(shape))}"
        if len(shape) == 3 and shape[0] not in CHANNELS and shape[-1] not in CHANNELS:
            return rf"{described}: neither its first nor its last axis"
        values = image.detach().float().numpy() if isinstance(image, torch.Tensor) else image
        if values.dtype in (np.uint8, np.bool_):
            return None
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return rf"{described} with NaN"
        if values.min() < 0 or values.max() > 255:
            return rf"{described} with values in \["
        fractional = not np.array_equal(values, np.round(values))
        if values.max() <= 1 and fractional:
            return rf"{described} with values in .*do_rescale=True reads pixels on the 0..255 scale"
        return None


def sizes(max_side: int = 2000, max_area: int = 4096, empty: bool = True):
    """(height, width): mostly small, some long and thin (up to `max_side`), a few empty."""
    small = st.tuples(st.integers(1, 48), st.integers(1, 48))
    long = st.integers(1, max_side).flatmap(
        lambda height: st.tuples(st.just(height), st.integers(1, max(1, min(max_side, max_area // height))))
    )
    zero = st.sampled_from([(0, 5), (5, 0), (0, 0)])
    return weighted((6, small), (2, long), *([(1, zero)] if empty else []))


@st.composite
def image_specs(draw, valid: bool = False, size_strategy=None, photos: bool = False):
    """An `ImageSpec`; `valid=True` only draws images every backend must accept, `photos=True` photo-like ones."""
    height, width = draw(sizes(empty=not valid) if size_strategy is None else size_strategy)
    seed = draw(st.integers(0, 2**16))
    kinds = ((4, "numpy"), (3, "pil"), (3, "torch")) + (() if photos else ((1, "gif"),))
    kinds += () if valid else ((1, "truncated"), (1, "none"))
    kind = draw(weighted(*[(weight, st.just(name)) for weight, name in kinds]))
    if kind in ("gif", "truncated"):
        smallest = 16 if kind == "truncated" else 1  # a PNG with pixel data left to cut
        return ImageSpec(kind, max(height, smallest), max(width, smallest), seed)
    if kind in ("pil", "none"):
        modes = [mode for mode in PIL_MODES if not (valid and mode == "La") and not (photos and mode == "1")]
        return ImageSpec(kind, height, width, seed, mode=draw(st.sampled_from(modes)),
                         values="photo" if photos else "pixels")
    dtypes = ("uint8", "float32", "float64", "int16") + (() if photos else ("bool",))
    dtypes += ("bfloat16", "float16") if kind == "torch" else ()
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(("hwc", "chw", "hw")))
    odd_channels = weighted((6, st.sampled_from(CHANNELS)), (1, st.sampled_from((2, 5))))  # (5, h, w): unreadable
    channels = draw(st.sampled_from(CHANNELS) if valid else odd_channels)
    if photos and dtype != "bool":
        values = "photo"
    elif dtype in ("uint8", "bool"):
        values = "pixels"
    elif dtype == "int16":
        values = draw(st.sampled_from(("pixels",) if valid else ("pixels", "pixels", "negative", "above")))
    else:
        choices = ("pixels", "fractional") if valid else ("pixels", "fractional", "unit", "negative", "above", "nan")
        values = draw(st.sampled_from(choices))
    requires_grad = kind == "torch" and draw(st.booleans())
    spec = ImageSpec(kind, height, width, seed, dtype=dtype, layout=layout, channels=channels, values=values,
                     requires_grad=requires_grad)
    if valid and spec.problem(0, spec.build()) is not None:  # e.g. a 1x1 float image of 0.7: a [0, 1] image
        spec = ImageSpec(kind, height, width, seed, dtype="uint8", layout="hwc", channels=3, values=spec.values)
    return spec


@st.composite
def image_settings(draw):
    """Image processor settings: crop (maybe not square), a resize that may be smaller than the crop, do_pad."""
    crop_height = draw(st.sampled_from((8, 16, 24, 32)))
    crop_width = draw(st.sampled_from((crop_height, 16, 32)))
    size = draw(st.sampled_from((
        {"shortest_edge": max(crop_height, crop_width)},
        {"shortest_edge": max(crop_height, crop_width) + 5},
        {"shortest_edge": max(4, min(crop_height, crop_width) - 3)},  # smaller than the crop: center_crop pads
        {"height": crop_height + 4, "width": crop_width + 2},
    )))
    return {"size": size, "crop_size": {"height": crop_height, "width": crop_width}, "do_pad": draw(st.booleans())}


@dataclass
class ImageBatch:
    """A batch of `ImageSpec`s arranged as a single image, a flat list or per-sample lists."""

    samples: list[list[ImageSpec]]
    structure: str  # "single", "flat", "nested"

    def build(self):
        built = [[spec.build() for spec in sample] for sample in self.samples]
        if self.structure == "single":
            return built[0][0]
        if self.structure == "flat":
            return [image for sample in built for image in sample]
        return built

    def flat(self, built) -> list:
        if self.structure == "single":
            return [built]
        return built if self.structure == "flat" else [image for sample in built for image in sample]


@st.composite
def image_batches(draw, specs=None, max_images: int = 4):
    specs = image_specs() if specs is None else specs
    num_samples = draw(st.integers(1, 3))
    samples = [draw(st.lists(specs, max_size=max_images // num_samples + 1)) for _ in range(num_samples)]
    total = sum(len(sample) for sample in samples)
    structures = ["flat", "nested"] + (["single"] if total == 1 and num_samples == 1 else [])
    structure = draw(st.sampled_from(structures))
    if structure == "single":
        samples = [sample for sample in samples if sample]
    return ImageBatch(samples, structure)


# ---------------------------------------------------------------------------------------------------------------------
# The image processor


def check_image_processor(
    batch: ImageBatch, processor_settings: dict, backend: str, return_tensors: str | None, tally: Tally
) -> None:
    images = batch.build()
    flat = batch.flat(images)
    problems = [p for p in (spec.problem(i, image) for i, (spec, image) in
                            enumerate(zip([s for sample in batch.samples for s in sample], flat))) if p]
    if not flat:
        problems.append(r"images holds no image \(an empty list\)")
    processor = LlavaExtImageProcessor(**processor_settings)
    try:
        with hard_time_limit():
            out = processor(images, return_tensors=return_tensors, image_backend=backend)
    except (ValueError, TypeError) as error:
        assert_names_a_problem(error, problems)
        tally["refused"] += 1
        return
    assert not problems, f"the input should have been refused: {problems}"
    tally["works"] += 1
    crop = processor_settings["crop_size"]
    expected_shape = (3, crop["height"], crop["width"])
    pixel_values = out["pixel_values"]
    assert len(pixel_values) == len(flat), "one pixel_values entry per image"
    for entry in pixel_values:
        assert tuple(entry.shape) == expected_shape
        entry = torch.as_tensor(np.asarray(entry)) if not isinstance(entry, torch.Tensor) else entry
        assert entry.dtype == torch.float32 and torch.isfinite(entry).all()


@pytest.mark.parametrize("budget", BUDGETS)
def test_image_processor_works_or_names_the_bad_image(budget):
    @fuzz_settings(budget, "image_processor")
    @given(batch=image_batches(), processor_settings=image_settings(), backend=st.sampled_from(["pil", "torch"]),
           return_tensors=st.sampled_from(["pt", None]))
    def run(batch, processor_settings, backend, return_tensors):
        check_image_processor(batch, processor_settings, backend, return_tensors, tally)

    tally = Tally()
    run()
    print(f"image processor: {tally}")
    assert tally["works"] and tally["refused"], tally


@pytest.mark.parametrize("budget", BUDGETS)
def test_extreme_sizes_work_on_both_backends(budget):
    """1x1 up to 10000x10 and 10x10000, padded to square (a 10000x10000 canvas) or not."""
    extreme = st.integers(1, 10_000).flatmap(
        lambda height: st.tuples(st.just(height), st.integers(1, max(1, min(10_000, 100_000 // height))))
    )
    extreme = weighted((1, extreme), (1, st.sampled_from([(1, 1), (10_000, 10), (10, 10_000), (1, 10_000)])))

    @fuzz_settings(budget, "extreme_sizes")
    @given(spec=image_specs(valid=True, size_strategy=extreme), processor_settings=image_settings(),
           backend=st.sampled_from(["pil", "torch"]))
    def run(spec, processor_settings, backend):
        check_image_processor(ImageBatch([[spec]], "single"), processor_settings, backend, "pt", tally)

    tally = Tally()
    run()
    print(f"extreme sizes: {tally}")
    assert not tally["refused"], tally


GREY_LEVEL = 1 / 255 / min(LlavaExtImageProcessor().image_std)  # one grey level after CLIP normalization, ~0.015


@pytest.mark.parametrize("budget", BUDGETS)
def test_torch_and_pil_backends_agree_on_what_both_accept(budget):
    @fuzz_settings(budget, "backends_agree")
    @given(batch=image_batches(specs=image_specs(valid=True, photos=True)), processor_settings=image_settings())
    def run(batch, processor_settings):
        images = batch.build()
        if not batch.flat(images):
            return
        processor = LlavaExtImageProcessor(**processor_settings)
        with hard_time_limit():
            pil = processor(images, return_tensors="pt", image_backend="pil")["pixel_values"]
            fast = processor(images, return_tensors="pt", image_backend="torch")["pixel_values"]
        assert fast.shape == pil.shape
        difference = (fast - pil).abs()
        # The filters are the same and their integer rounding differs by about a grey level. Single pixels at sharp
        # edges differ more where one axis shrinks and the other grows: Pillow 13 then resizes the height first, torch
        # the width, and bicubic overshoot is clipped to 0..255 between the two passes (on white noise, by up to 25
        # grey levels; hence photo-like images here, as in tests/test_image_processing).
        assert difference.mean() <= GREY_LEVEL, difference.mean()
        assert torch.quantile(difference.flatten(), 0.99) <= 3 * GREY_LEVEL
        assert difference.max() <= 20 * GREY_LEVEL, difference.max()
        tally["works"] += 1

    tally = Tally()
    run()
    print(f"backends agree: {tally}")


# ---------------------------------------------------------------------------------------------------------------------
# The processor: random text, markers, image batches, tower settings and truncation

CHARS = string.printable[:95] + "\n"  # conftest's character vocabulary after its 5 special tokens
TEXT_CHARS = "".join(c for c in CHARS if c not in "<>")  # no accidental '<image>', '</s>' or '<|...|>' in random text
DECOYS = ("<imag", "mage>", "<IMAGE>", "< image>")  # look like markers, are not


def char_ids(text: str, tokens_per_image: int) -> list[int]:
    """The tiny tokenizer's ids for `text` (BOS not included): one per character, '<image>' x tokens_per_image,
    '<s>' / '</s>' as BOS / EOS."""
    ids, position = [], 0
    while position < len(text):
        if text.startswith("<image>", position):
            ids += [IMAGE_TOKEN_ID] * tokens_per_image
            position += len("<image>")
        elif text.startswith("</s>", position) or text.startswith("<s>", position):
            ids.append(EOS_ID if text.startswith("</s>", position) else BOS_ID)
            position += 4 if text.startswith("</s>", position) else 3
        else:
            ids.append(5 + CHARS.index(text[position]))
            position += 1
    return ids


@cache
def tiny_processor(patch_size: int, strategy: str, additional: int, crop: int) -> LlavaExtProcessor:
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    return LlavaExtProcessor(image_processor, build_tiny_tokenizer(), patch_size=patch_size,
                             vision_feature_select_strategy=strategy, num_additional_image_tokens=additional)


@st.composite
def prompt_text(draw, markers: int) -> str:
    """Random text with `markers` '<image>' markers at random places, and a few decoys."""
    pieces = [draw(st.text(TEXT_CHARS, max_size=12)) for _ in range(markers + 1)]
    if draw(st.integers(0, 4)) == 0:
        pieces[0] += draw(st.sampled_from(DECOYS))
    return "<image>".join(pieces)


@dataclass
class ProcessorCase:
    settings: tuple  # (patch_size, strategy, additional, crop)
    batch: ImageBatch
    markers: list[int]
    texts: list[str]
    text_as_str: bool
    extra_list: bool  # nested images get one list more than there are samples
    empty_images: str  # how a batch without images is passed: "none", "[]" or "[[], ...]"
    max_length: int | None
    return_tensors: str | None
    backend: str


@st.composite
def processor_cases(draw):
    settings_ = (draw(st.sampled_from((4, 8, 16, 64))), draw(st.sampled_from(("default", "full"))),
                 draw(st.sampled_from((0, 1))), draw(st.sampled_from((16, 32))))
    specs = weighted((8, image_specs(valid=True, size_strategy=sizes(max_side=200, empty=False))), (1, image_specs()))
    batch = draw(image_batches(specs=specs, max_images=4))
    num_samples = len(batch.samples)
    markers = [draw(weighted((6, st.just(len(sample))), (1, st.integers(0, 3)))) for sample in batch.samples]
    texts = [draw(prompt_text(count)) for count in markers]
    return ProcessorCase(
        settings=settings_, batch=batch, markers=markers, texts=texts,
        text_as_str=num_samples == 1 and draw(st.booleans()),
        extra_list=batch.structure == "nested" and draw(st.integers(0, 9)) == 0,
        empty_images=draw(st.sampled_from(("none", "[]", "[[], ...]"))),
        max_length=draw(weighted((4, st.none()), (1, st.integers(1, 120)))),
        return_tensors=draw(st.sampled_from(("pt", None))), backend=draw(st.sampled_from(("pil", "torch"))),
    )


def tokens_per_image(patch_size: int, strategy: str, additional: int, crop: int) -> int:
    return (crop // patch_size) ** 2 + additional - int(strategy == "default")


def check_processor(case: ProcessorCase, tally: Tally) -> None:
    processor = tiny_processor(*case.settings)
    per_image = tokens_per_image(*case.settings)
    specs = [spec for sample in case.batch.samples for spec in sample]
    images = case.batch.build()
    flat = case.batch.flat(images)
    if case.extra_list:
        images = images + [[]]
    if not flat:
        images = {"none": None, "[]": [], "[[], ...]": [[] for _ in case.batch.samples]}[case.empty_images]

    problems = [p for p in (spec.problem(i, image) for i, (spec, image) in enumerate(zip(specs, flat))) if p]
    if sum(case.markers) != len(flat):
        problems.append(rf"The text has {sum(case.markers)} '<image>' markers \(per sample: "
                        rf"{re.escape(str(case.markers))}\) but {len(flat)} images were given")
    per_sample = [len(sample) for sample in case.batch.samples] + ([0] if case.extra_list else [])
    if case.batch.structure == "nested" and flat and per_sample != case.markers:
        problems.append(rf"images has {len(per_sample)} per-sample lists but the text has {len(case.markers)} samples"
                        if len(per_sample) != len(case.markers) else r"Sample \d+ has \d+ '<image>' markers but its")
    if flat and per_image < 1:
        problems.append(rf"gives {per_image} image tokens with patch_size={case.settings[0]}")
    expected_ids = [[BOS_ID] + char_ids(text, per_image) for text in case.texts]
    if case.max_length is not None:
        for index, ids in enumerate(expected_ids):
            kept = ids[: case.max_length].count(IMAGE_TOKEN_ID)
            if kept != ids.count(IMAGE_TOKEN_ID):
                problems.append(rf"Truncation would cut image tokens: sample {index} has {ids.count(IMAGE_TOKEN_ID)} "
                                rf"image tokens.*only {kept} are left.*at least {len(ids)}\b")

    kwargs = dict(return_tensors=case.return_tensors, image_backend=case.backend,
                  padding=case.return_tensors == "pt" and len(case.texts) > 1)
    if case.max_length is not None:
        kwargs.update(truncation=True, max_length=case.max_length)
    text = case.texts[0] if case.text_as_str else case.texts
    try:
        with hard_time_limit():
            out = processor(images=images, text=text, **kwargs)
    except (ValueError, TypeError) as error:
        assert_names_a_problem(error, problems)
        tally["refused"] += 1
        return
    assert not problems, f"the input should have been refused: {problems}"
    tally["works"] += 1

    input_ids = out["input_ids"].tolist() if case.return_tensors == "pt" else out["input_ids"]
    attention = out["attention_mask"].tolist() if case.return_tensors == "pt" else out["attention_mask"]
    for row, ids in enumerate(expected_ids):
        ids = ids[: case.max_length] if case.max_length is not None else ids
        padding = len(input_ids[row]) - len(ids)  # the tiny tokenizer pads on the left
        assert input_ids[row] == [PAD_ID] * padding + ids
        assert attention[row] == [0] * padding + [1] * len(ids)
        assert input_ids[row].count(IMAGE_TOKEN_ID) == case.markers[row] * per_image
    if not flat:
        assert "pixel_values" not in out
    else:
        assert len(out["pixel_values"]) == len(flat)
        crop = case.settings[3]
        assert all(tuple(entry.shape) == (3, crop, crop) for entry in out["pixel_values"])


@pytest.mark.parametrize("budget", BUDGETS)
def test_processor_expands_every_marker_or_names_the_mismatch(budget):
    @fuzz_settings(budget, "processor")
    @given(case=processor_cases())
    def run(case):
        check_processor(case, tally)

    tally = Tally()
    run()
    print(f"processor: {tally}")
    assert tally["works"] and tally["refused"], tally


# ---------------------------------------------------------------------------------------------------------------------
# The collator: random conversations, templates, truncation lengths and skipped samples

TEMPLATES = ("llava-1.5", "mistral", "chatml", "llama-3")
# Where each format's trained span (the answer and its end-of-turn marker) starts and ends, from the formats' published
# definitions (as tests/test_data.py): the assistant header before it, the end marker closing it.
ANSWER_HEADER = {"llava-1.5": "ASSISTANT: ", "mistral": "[/INST] ", "chatml": "<|im_start|>assistant\n",
                 "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
END_OF_ANSWER = {"llava-1.5": "</s>", "mistral": "</s>", "chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}
COLLATOR_TOKENS_PER_IMAGE = 16  # (32 // 8)^2 + CLS - CLS, the tiny CLIP settings


@cache
def collator_processor(template: str) -> LlavaExtProcessor:
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaExtProcessor(image_processor, build_tiny_tokenizer(), patch_size=8,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=template)


@st.composite
def user_message(draw, with_images: bool):
    """A user turn: a plain string, or blocks of text and (sometimes) images; rarely a literal '<image>' in the text."""
    if not with_images and draw(st.booleans()):
        return {"role": "user", "content": draw(st.text(TEXT_CHARS, max_size=10))}
    blocks = []
    for _ in range(draw(st.integers(0, 3))):
        if with_images and draw(st.integers(0, 2)) == 0:
            height, width = draw(st.tuples(st.integers(1, 40), st.integers(1, 40)))
            image = PIL.Image.fromarray(np.full((height, width, 3), draw(st.integers(0, 255)), dtype=np.uint8))
            blocks.append({"type": "image", "image": image})
        else:
            blocks.append({"type": "text", "text": draw(st.text(TEXT_CHARS, max_size=10))})
    if draw(st.integers(0, 15)) == 0:
        blocks.append({"type": "text", "text": "see <image> here"})  # a marker without an image: a malformed sample
    return {"role": "user", "content": blocks}


@st.composite
def conversations(draw, with_images: bool):
    messages = []
    if draw(st.integers(0, 3)) == 0:
        system = draw(st.text(TEXT_CHARS, max_size=8))
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for _ in range(draw(st.integers(1, 3))):
        messages.append(draw(user_message(with_images)))
        answer = draw(st.text(TEXT_CHARS, max_size=10))
        if draw(st.integers(0, 5)) == 0:  # sometimes no answer to this turn: the conversation ends with a question
            break
        content = [{"type": "text", "text": answer}]
        if with_images and draw(st.integers(0, 20)) == 0:  # an image no template renders: a count mismatch
            content.append({"type": "image", "image": PIL.Image.new("RGB", (8, 8))})
        messages.append({"role": "assistant", "content": content if draw(st.booleans()) else answer})
    return messages


@dataclass
class CollatorCase:
    template: str
    samples: list  # dicts with "id" and "messages", or None (a skipped sample)
    model_max_length: int | None
    on_overlong: str


@st.composite
def collator_cases(draw, with_images: bool):
    num_samples = draw(st.integers(1, 3))
    samples = [None if draw(st.integers(0, 7)) == 0 else {"id": f"s{k}", "messages": draw(conversations(with_images))}
               for k in range(num_samples)]
    limit = draw(weighted((1, st.none()), (1, st.integers(1, 60 if not with_images else 150))))
    return CollatorCase(draw(st.sampled_from(TEMPLATES)), samples, limit, draw(st.sampled_from(("raise", "drop"))))


def expected_encoding(processor, template: str, messages: list) -> tuple[list[int], list[int]] | str:
    """A sample's full input_ids and labels from its rendered text alone; or the problem (a regex) it must raise."""
    texts = [m["content"] if isinstance(m["content"], str) else "".join(b.get("text", "") for b in m["content"])
             for m in messages]
    if any("<image>" in text for text in texts):
        return r"'<image>'"
    rendered = processor.apply_chat_template(messages, tokenize=False)
    num_images = sum(b["type"] == "image" for m in messages if not isinstance(m["content"], str) for b in m["content"])
    if rendered.count("<image>") != num_images:
        return rf"{rendered.count('<image>')} '<image>' markers .* but {num_images} images"
    if not any(m["role"] == "assistant" for m in messages):
        return "marks no assistant tokens"
    trained = [False] * len(rendered)
    cursor = 0
    for message, text in zip(messages, texts):
        if message["role"] == "assistant":
            span = ANSWER_HEADER[template] + text + END_OF_ANSWER[template]
            start = rendered.index(span, cursor) + len(ANSWER_HEADER[template])
            cursor = start + len(text + END_OF_ANSWER[template])
            trained[start:cursor] = [True] * (cursor - start)
    # one BOS: the template's "<s>", or else the tokenizer's
    ids, labels, position = [BOS_ID], [IGNORE_INDEX], len("<s>") if rendered.startswith("<s>") else 0
    while position < len(rendered):  # random text has no '<', so '<image>' and '</s>' come from the template only
        if rendered.startswith("<image>", position):
            ids += [IMAGE_TOKEN_ID] * COLLATOR_TOKENS_PER_IMAGE
            labels += [IGNORE_INDEX] * COLLATOR_TOKENS_PER_IMAGE
            position += len("<image>")
            continue
        token, width = (EOS_ID, len("</s>")) if rendered.startswith("</s>", position) else (
            5 + CHARS.index(rendered[position]), 1)
        ids.append(token)
        labels.append(token if trained[position] else IGNORE_INDEX)
        position += width
    return ids, labels


def check_collator(case: CollatorCase, tally: Tally) -> None:
    processor = collator_processor(case.template)
    collator = LlavaExtDataCollator(processor, model_max_length=case.model_max_length, on_overlong=case.on_overlong)
    limit = case.model_max_length
    problems, kept, dropped, answerless = [], [], [], []
    for sample in case.samples:
        if sample is None:
            continue
        expected = expected_encoding(processor, case.template, sample["messages"])
        if isinstance(expected, str):
            problems.append(rf"Sample '{sample['id']}'.*{expected}")
            continue
        ids, labels = expected
        if limit is not None and len(ids) > limit:
            if IMAGE_TOKEN_ID in ids[limit:]:  # a cut through the image tokens: refused
                if case.on_overlong == "raise":
                    problems.append(rf"Sample '{sample['id']}' is {len(ids)} tokens and its image tokens run to "
                                    rf"position .* past model_max_length={limit}")
                else:
                    dropped.append(sample["id"])
                continue
            if all(label == IGNORE_INDEX for label in labels[:limit]):  # a cut before the first answer: warned
                answerless.append(sample["id"])
            ids, labels = ids[:limit], labels[:limit]
        num_images = sum(b["type"] == "image" for m in sample["messages"] if not isinstance(m["content"], str)
                         for b in m["content"])
        kept.append((ids, labels, num_images))
    if not problems and not kept:
        problems.append(rf"Every one of the {len(case.samples)} samples in this batch was skipped or dropped")

    try:
        with hard_time_limit(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = collator(case.samples)
    except (ValueError, TypeError) as error:
        assert_names_a_problem(error, problems)
        tally["refused"] += 1
        return
    assert not problems, f"the batch should have been refused: {problems}"
    tally["works"] += 1
    messages = " ".join(str(warning.message) for warning in caught)
    assert re.findall(r"Dropping a sample: Sample '(s\d)'", messages) == dropped
    assert re.findall(r"Sample '(s\d)' is \d+ tokens and its answers start at position", messages) == answerless

    longest = max(len(ids) for ids, _, _ in kept)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (len(kept), longest)
    for row, (ids, labels, num_images) in enumerate(kept):  # right padding: pad ids, no attention, no loss
        padding = longest - len(ids)
        assert batch["input_ids"][row].tolist() == ids + [PAD_ID] * padding
        assert batch["labels"][row].tolist() == labels + [IGNORE_INDEX] * padding
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * padding
        assert (batch["input_ids"][row] == IMAGE_TOKEN_ID).sum() == num_images * COLLATOR_TOKENS_PER_IMAGE
    assert not (batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID] != IGNORE_INDEX).any()
    num_images = sum(count for _, _, count in kept)
    if num_images:
        assert batch["pixel_values"].shape == (num_images, 3, 32, 32)
    else:
        assert "pixel_values" not in batch


@pytest.mark.parametrize("budget", BUDGETS)
def test_collator_labels_answers_only_on_text_conversations(budget):
    @fuzz_settings(budget, "collator_text")
    @given(case=collator_cases(with_images=False))
    def run(case):
        check_collator(case, tally)

    tally = Tally()
    run()
    print(f"collator, text: {tally}")
    assert tally["works"] and tally["refused"], tally


@needs_image_assistant_masks
@pytest.mark.parametrize("budget", BUDGETS)
def test_collator_keeps_image_tokens_whole_or_names_the_sample(budget):
    @fuzz_settings(budget, "collator_images")
    @given(case=collator_cases(with_images=True))
    def run(case):
        check_collator(case, tally)

    tally = Tally()
    run()
    print(f"collator, images: {tally}")
    assert tally["works"] and tally["refused"], tally


# The collator's messages, pinned one by one


def answer(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.mark.parametrize(
    "samples, message",
    [
        ([{"id": "a", "messages": [{"role": "user", "content": "Hi"}, answer("Yo")]}, "oops"],
         r"Batch item 1 is a str; the collator takes \{'id': ..., 'messages': \[...\]\} items"),
        ([{"id": "a"}], r"Batch item 0 is a dict with keys \['id'\]; the collator takes"),
        ([{"id": "a", "messages": [{"role": "user", "content": 7}, answer("Yo")]}],
         r"Sample 'a': message 0 is a dict with content of type int; a message is"),
        ([{"id": "a", "messages": [{"role": "user", "content": "<image>\nWhat is it?"}, answer("A cat.")]}],
         r"Sample 'a': message 0's text contains '<image>', which would be read as an image marker without an image"),
    ],
    ids=["not a dict", "no messages", "content not str or blocks", "marker in the text"],
)
def test_collator_names_malformed_items(samples, message):
    with pytest.raises(SampleError, match=message):
        LlavaExtDataCollator(collator_processor("llava-1.5"))(samples)


def test_collator_warns_of_a_cut_that_leaves_a_sample_no_answer():
    # <s> "USER: " x*40 " " "ASSISTANT: " | "short" </s>: 1 + 6 + 40 + 1 + 11 = 59 prompt tokens, then 6 trained
    long = {"id": "long-question", "messages": [{"role": "user", "content": "x" * 40}, answer("short")]}
    collator = LlavaExtDataCollator(collator_processor("llava-1.5"), model_max_length=30)
    with pytest.warns(UserWarning, match=r"Sample 'long-question' is 65 tokens and its answers start at position 60, "
                                         r"past model_max_length=30: cut there, it has no answer token to train on"):
        batch = collator([long, {"id": "short", "messages": [{"role": "user", "content": "Hi"}, answer("Yo")]}])
    assert batch["labels"][0].eq(IGNORE_INDEX).all() and batch["labels"][1].ne(IGNORE_INDEX).sum() == 3  # "Yo</s>"


@needs_image_assistant_masks
def test_collator_names_the_sample_when_the_processor_refuses_it():
    picture = PIL.Image.new("RGB", (8, 8))
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yo"}, {"type": "image", "image": picture}]}]
    with pytest.raises(SampleError, match=r"Sample 'img-in-answer': The text has 1 '<image>' markers .* but 2 images"):
        LlavaExtDataCollator(collator_processor("llava-1.5"))([{"id": "img-in-answer", "messages": messages}])


def test_collator_needs_a_token_to_pad_with():
    processor = LlavaExtProcessor(LlavaExtImageProcessor(), build_tiny_tokenizer(), patch_size=8)
    processor.tokenizer.pad_token = None
    processor.tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"The tokenizer has neither a pad_token nor an eos_token"):
        LlavaExtDataCollator(processor)
