"""LlavaExtNextProcessor and LlavaExtOnevisionProcessor against transformers' LlavaNextProcessor and
LlavaOnevisionProcessor (input_ids, pixel values, counts), videos, chat templates, errors, and remote code."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import BOS_ID, HANG_GUARD_S, IMAGE_TOKEN_ID, build_tiny_tokenizer, isolated_env
from test_image_processing_llava_ext import photo
from test_image_processing_llava_ext_next import NEXT, ONEVISION, TILE
from test_remote_code import disallowed_import, imported_modules
from transformers import (
    AutoProcessor,
    BatchFeature,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)
from transformers.video_utils import make_batched_videos

import llava_ext
from llava_ext import (
    LlavaExtNextConfig,
    LlavaExtNextImageProcessor,
    LlavaExtNextProcessor,
    LlavaExtOnevisionConfig,
    LlavaExtOnevisionImageProcessor,
    LlavaExtOnevisionProcessor,
)

PATCH = 8
SIZES = [(40, 60), (17, 100), (64, 64), (33, 31), (150, 97), (7, 5), (32, 96)]
IMAGES = [PIL.Image.fromarray(photo(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
FRAMES = [PIL.Image.fromarray(photo(40, 60, seed=10 + i)) for i in range(4)]
STRATEGIES = {  # (vision_feature_select_strategy, num_additional_image_tokens): CLIP towers, SigLIP towers
    "clip default": ("default", 1),
    "clip full": ("full", 1),
    "siglip full": ("full", 0),
}


def tokenizer_with_video():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


VIDEO_TOKEN_ID = tokenizer_with_video().convert_tokens_to_ids("<video>")


def next_processors(strategy="clip default", **kwargs):
    select, extra = STRATEGIES[strategy]
    settings = dict(patch_size=PATCH, vision_feature_select_strategy=select, num_additional_image_tokens=extra)
    reference = LlavaNextProcessor(LlavaNextImageProcessorPil(**NEXT), build_tiny_tokenizer(), **settings)
    ours = LlavaExtNextProcessor(LlavaExtNextImageProcessor(**NEXT), build_tiny_tokenizer(), **settings, **kwargs)
    return reference, ours


class ReferenceOnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' processor; its video processor needs torchvision (not installed here), so video frames go
    through transformers' plain PIL image pipeline, resized to the tile, which is what the count reads."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def video_processor(self):
        frames = LlavaImageProcessorPil(size={"height": TILE, "width": TILE}, do_center_crop=False)
        return lambda videos, **kwargs: BatchFeature(
            {"pixel_values_videos": [frames(video, return_tensors="np").pixel_values for video in make_batched_videos(videos)]}
        )


def onevision_processors(strategy="siglip full", vision_aspect_ratio="anyres_max_2"):
    select, extra = STRATEGIES[strategy]
    assert extra == 0  # transformers' OneVision processor has no CLS term
    reference = ReferenceOnevisionProcessor(
        LlavaOnevisionImageProcessorPil(**ONEVISION), tokenizer_with_video(), num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy=select, vision_aspect_ratio=vision_aspect_ratio,
    )
    ours = LlavaExtOnevisionProcessor(
        LlavaExtOnevisionImageProcessor(**ONEVISION), tokenizer_with_video(), patch_size=PATCH,
        vision_feature_select_strategy=select, vision_aspect_ratio=vision_aspect_ratio,
    )
    return reference, ours


def assert_same_outputs(actual, expected):
    assert set(actual.keys()) == set(expected.keys())
    for key in expected:
        assert torch.equal(torch.as_tensor(actual[key]), torch.as_tensor(expected[key])), key


# ---------------------------------------------------------------------------------------------------------- NeXT


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_next_equals_transformers_per_image_size(strategy, size):
    reference, ours = next_processors(strategy)
    image = PIL.Image.fromarray(photo(*size))
    text = "USER: <image>\nWhat is it? ASSISTANT:"
    expected, actual = reference(images=image, text=text, return_tensors="pt"), ours(images=image, text=text, return_tensors="pt")
    assert_same_outputs(actual, expected)
    assert (actual["input_ids"] == IMAGE_TOKEN_ID).sum() > (TILE // PATCH) ** 2  # more than a base view


def test_next_equals_transformers_on_a_mixed_batch_with_several_images_per_sample():
    """Mixed sizes across and within samples (#11, #12): per-image counts and padded crops as transformers makes them."""
    reference, ours = next_processors()
    text = ["USER: <image>\nA <image>\nB ASSISTANT:", "USER: <image>\n<image>\n<image>\nC ASSISTANT:", "no image"]
    images = [IMAGES[:2], IMAGES[2:5], []]
    expected = reference(images=IMAGES[:5], text=text, return_tensors="pt", padding=True)
    actual = ours(images=images, text=text, return_tensors="pt", padding=True)
    assert_same_outputs(actual, expected)
    counts = (actual["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    expected_counts = reference._get_num_multimodal_tokens(image_sizes=SIZES[:5]).num_image_tokens
    assert counts == [sum(expected_counts[:2]), sum(expected_counts[2:5]), 0]


def test_next_counts_for_serving_equal_transformers():
    reference, ours = next_processors()
    expected = reference._get_num_multimodal_tokens(image_sizes=SIZES)
    actual = ours._get_num_multimodal_tokens(image_sizes=SIZES)
    assert actual.num_image_tokens == expected.num_image_tokens and len(set(actual.num_image_tokens)) > 1


def test_next_per_call_pinpoints_enter_the_count():
    reference, ours = next_processors()
    pinpoints = [[32, 32], [64, 64]]
    reference.image_processor.image_grid_pinpoints = pinpoints  # transformers' count reads the instance's only
    expected = reference(images=IMAGES[0], text="<image>", return_tensors="pt")
    actual = ours(images=IMAGES[0], text="<image>", return_tensors="pt", image_grid_pinpoints=pinpoints)
    assert_same_outputs(actual, expected)


def test_next_errors_name_the_cause():
    _, ours = next_processors()
    with pytest.raises(ValueError, match=r"The text has 1 '<image>' markers \(per sample: \[1\]\) but 2 images"):
        ours(images=IMAGES[:2], text="USER: <image>\nHi")
    with pytest.raises(ValueError, match=r"Sample 0 has 2 '<image>' markers but its image list has 1 images"):
        ours(images=[IMAGES[:1], IMAGES[1:3]], text=["<image><image>", "<image>"])
    with pytest.raises(ValueError, match=r"Truncation would cut image tokens: sample 0 has \d+ image tokens .*max_length"):
        ours(images=IMAGES[0], text="USER: <image>\nHi", truncation=True, max_length=20)
    no_patch = LlavaExtNextProcessor(LlavaExtNextImageProcessor(**NEXT), build_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"patch_size is None, so the number of tokens per image is unknown"):
        no_patch(images=IMAGES[0], text="<image>")
    coarse = LlavaExtNextProcessor(LlavaExtNextImageProcessor(**NEXT), build_tiny_tokenizer(), patch_size=64)
    with pytest.raises(ValueError, match=r"A 32x32 image gives 0 image tokens with patch_size=64"):
        coarse(images=IMAGES[0], text="<image>")


@pytest.mark.parametrize("template", ["llava-1.6-vicuna", "mistral"])
def test_next_chat_template_with_several_images_tokenizes(template):
    reference, ours = next_processors(chat_template=template)
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": IMAGES[0]}, {"type": "image", "image": IMAGES[1]}, {"type": "text", "text": "Same?"},
    ]}]
    out = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert ids.count(IMAGE_TOKEN_ID) == sum(reference._get_num_multimodal_tokens(image_sizes=SIZES[:2]).num_image_tokens)
    expected_pixels = LlavaNextImageProcessorPil(**NEXT)(IMAGES[:2], return_tensors="pt")
    assert torch.equal(out["pixel_values"], expected_pixels["pixel_values"])
    assert out["image_sizes"].tolist() == [list(size) for size in SIZES[:2]]


def test_next_default_template_is_vicuna():
    _, ours = next_processors()
    rendered = ours.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                        add_generation_prompt=True)
    assert rendered.startswith("<s>A chat between a curious human") and rendered.endswith("USER: <image>\nHi ASSISTANT:")


# ------------------------------------------------------------------------------------------------------ OneVision


@pytest.mark.parametrize("vision_aspect_ratio", ["anyres_max_1", "anyres_max_2", "anyres_max_9"])
@pytest.mark.parametrize("strategy", ["siglip full"])
def test_onevision_equals_transformers_single_and_multi_image(strategy, vision_aspect_ratio):
    """One image per sample: anyres, shrunk to N tiles' worth; several in one sample: base view + newline each."""
    reference, ours = onevision_processors(strategy, vision_aspect_ratio)
    text = ["<|im_start|>user\n<image>\nA<|im_end|>", "<image>\n<image>\nB", "<image> C", "text only"]
    images = [[IMAGES[4]], IMAGES[1:3], [IMAGES[3]], []]
    expected = reference(images=images, text=text, return_tensors="pt", padding=True)
    actual = ours(images=images, text=text, return_tensors="pt", padding=True)
    assert_same_outputs(actual, expected)
    assert actual["batch_num_images"].tolist() == [1, 2, 1]


def test_onevision_default_strategy_and_flat_lists_equal_transformers():
    reference, ours = onevision_processors()
    for processor in (reference, ours):
        processor.vision_feature_select_strategy = "default"
    text = ["<image>a", "<image>b", "<image>c"]
    expected = reference(images=IMAGES[:3], text=text, return_tensors="pt", padding=True)
    actual = ours(images=IMAGES[:3], text=text, return_tensors="pt", padding=True)
    assert_same_outputs(actual, expected)


@pytest.mark.parametrize(
    "video",
    [lambda: FRAMES, lambda: np.stack([np.asarray(frame) for frame in FRAMES])],
    ids=["pil frames", "numpy (frames, h, w, c)"],
)
def test_onevision_video_tokens_equal_transformers(video):
    reference, ours = onevision_processors()
    text = "<|im_start|>user\n<video>\nWhat happens?<|im_end|>"
    expected = reference(videos=[video()], text=text, return_tensors="pt")
    actual = ours(videos=[video()], text=text, return_tensors="pt")
    assert_same_outputs(actual, expected)
    pooled = -(-(TILE // PATCH) // 2)
    assert (actual["input_ids"] == VIDEO_TOKEN_ID).sum() == len(FRAMES) * pooled**2 + 1
    assert actual["pixel_values_videos"].shape == (1, len(FRAMES), 3, TILE, TILE)


def test_onevision_images_and_videos_in_one_batch_equal_transformers():
    reference, ours = onevision_processors()
    text = ["<image>\n<video>\nA", "<video>\nB <video>"]
    images, videos = [[IMAGES[0]], []], [[FRAMES[:2]], [FRAMES[:3], FRAMES[1:]]]
    with pytest.raises(ValueError, match=r"different frame counts or sizes"):  # 2, 3 and 3 frames: no one tensor
        ours(images=images, videos=videos, text=text, return_tensors="pt", padding=True)
    videos = [[FRAMES[:3]], [FRAMES[:3], FRAMES[1:]]]
    expected = reference(images=images, videos=videos, text=text, return_tensors="pt", padding=True)
    actual = ours(images=images, videos=videos, text=text, return_tensors="pt", padding=True)
    assert_same_outputs(actual, expected)


def test_onevision_counts_for_serving_equal_transformers():
    reference, ours = onevision_processors()
    expected = reference._get_num_multimodal_tokens(image_sizes=SIZES, video_sizes=[(4, 40, 60), (9, 10, 10)])
    actual = ours._get_num_multimodal_tokens(image_sizes=SIZES, video_sizes=[(4, 40, 60), (9, 10, 10)])
    assert actual.num_image_tokens == expected.num_image_tokens
    # 5.17's helper counts no videos: transformers' count is its replace_video_token on frames of the tile size
    frames = [np.zeros((count, 3, TILE, TILE)) for count in (4, 9)]
    expected_videos = [len(reference.replace_video_token({"pixel_values_videos": frames}, i)) // len("<video>") for i in (0, 1)]
    assert actual.num_video_tokens == expected_videos == [17, 37]


def test_onevision_chat_template_with_images_and_video_frames_tokenizes():
    reference, ours = onevision_processors()
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": IMAGES[0]}, {"type": "image", "image": IMAGES[1]},
        {"type": "video", "video": FRAMES}, {"type": "text", "text": "Which?"},
    ]}]
    out = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    rendered = ours.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n<image>\n<image>\n<video>\nWhich?<|im_end|>\n<|im_start|>assistant\n"
    expected = reference(images=[IMAGES[:2]], videos=[[FRAMES]], text=rendered, return_tensors="pt")
    assert_same_outputs(out, expected)
    assert out["batch_num_images"].tolist() == [2]  # two images in the sample: one crop each


def test_onevision_errors_name_the_cause():
    _, ours = onevision_processors()
    with pytest.raises(ValueError, match=r"The text has 0 '<video>' markers \(per sample: \[0\]\) but 1 videos"):
        ours(videos=[FRAMES], text="no marker")
    with pytest.raises(ValueError, match=r"markers \(\[1, 0\]\) do not match their video lists \(\[0, 1\] videos\)"):
        ours(videos=[[], [FRAMES]], text=["<video>", "none"])
    with pytest.raises(ValueError, match=r"Truncation would cut video tokens: sample 0 has 17 video tokens"):
        ours(videos=[FRAMES], text="<video>", truncation=True, max_length=10)
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres_9' is not supported; use 'anyres_max_N'"):
        LlavaExtOnevisionProcessor(LlavaExtOnevisionImageProcessor(**ONEVISION), tokenizer_with_video(), patch_size=8,
                                   vision_aspect_ratio="anyres_9")
    with pytest.raises(ValueError, match=r"The tokenizer has no token '<video>' \(video_token\); add it"):
        LlavaExtOnevisionProcessor(LlavaExtOnevisionImageProcessor(**ONEVISION), build_tiny_tokenizer(), patch_size=8)


# ------------------------------------------------------------------------------------- registration, remote code

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import torch
    from transformers import AutoProcessor

    checkpoint, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path, weights_only=False)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    outputs = processor(**inputs, return_tensors="pt", padding=True)
    classes = [type(processor).__name__, type(processor.image_processor).__name__]
    modules = sorted({type(processor).__module__.split(".")[0], type(processor.image_processor).__module__.split(".")[0]})
    torch.save({"outputs": dict(outputs), "classes": classes, "modules": modules}, out_path)
    """
)
SHIPPED = [
    "anyres.py", "image_processing_llava_ext.py", "image_processing_llava_ext_next.py",
    "image_processing_llava_ext_onevision.py", "processing_llava_ext.py", "processing_llava_ext_next.py",
    "processing_llava_ext_onevision.py",
]


@pytest.mark.parametrize("name", [name for name in SHIPPED if "_next" in name or "_onevision" in name])
def test_shipped_processor_files_import_only_stable_public_names(name):
    path = Path(llava_ext.__file__).parent / name
    bad = [f"{name}:{line}: {module}" for line, module in imported_modules(path) if disallowed_import(module)]
    assert not bad, "shipped processor code imports outside the stable public set:\n" + "\n".join(bad)


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_auto_classes_find_the_processors_of_each_config(family, tmp_path):
    if family == "next":
        _, processor = next_processors()
        config = LlavaExtNextConfig()
        classes = (LlavaExtNextImageProcessor, LlavaExtNextProcessor)
    else:
        _, processor = onevision_processors()
        config = LlavaExtOnevisionConfig()
        classes = (LlavaExtOnevisionImageProcessor, LlavaExtOnevisionProcessor)
    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert (type(reloaded.image_processor), type(reloaded)) == classes
    assert reloaded.image_processor.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    assert reloaded.patch_size == PATCH and reloaded.chat_template == processor.chat_template


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_trust_remote_code_processor_without_llava_ext(family, tmp_path):
    if family == "next":
        _, processor = next_processors()
        inputs = {"images": [IMAGES[:2], IMAGES[2:3]], "text": ["<image> <image> a", "<image> b"]}
    else:
        _, processor = onevision_processors()
        inputs = {"images": [IMAGES[:2], IMAGES[2:3]], "videos": [[], [FRAMES]], "text": ["<image><image>", "<image><video>"]}
    processor.save_pretrained(tmp_path / "checkpoint")
    shipped = sorted(path.name for path in (tmp_path / "checkpoint").glob("*.py"))
    assert set(shipped) >= {f"processing_llava_ext_{family}.py", f"image_processing_llava_ext_{family}.py", "anyres.py"}
    assert set(shipped) <= set(SHIPPED)
    expected = processor(**inputs, return_tensors="pt", padding=True)
    torch.save(inputs, tmp_path / "inputs.pt")
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert result["classes"] == [type(processor).__name__, type(processor.image_processor).__name__]
    assert result["modules"] == ["transformers_modules"]
    assert_same_outputs(result["outputs"], expected)
