"""LlavaExt-OneVision against transformers' LlavaOnevisionForConditionalGeneration on the same random weights.

Image pixels come from transformers' own PIL image processor, each <image> expanded to the reference's count; videos
are random frames (transformers' video processor needs torchvision), their placeholder count read off the reference's
features. Covered: single images of sizes no multiple of the patch (8) or tile (32), a batch of mixed sizes, a sample
with several images (batch_num_images), videos (pooled frames) and both in one batch; stock checkpoints (5.x save,
in-memory names) load, ours save the stock layout, the shipped code loads in a Python without llava_ext.
"""

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, IMAGE_TOKEN_ID, build_tiny_tokenizer, isolated_env, tiny_llava_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_modeling_llava_ext_next import REMOTE_SCRIPT
from transformers import AutoModelForImageTextToText, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from llava_ext import ImageTokenMismatchError
from llava_ext.configuration_llava_ext_onevision import LlavaExtOnevisionConfig
from llava_ext.modeling_llava_ext_onevision import LlavaExtOnevisionForConditionalGeneration, LlavaExtOnevisionModel

TILE, PATCH = 32, 8
PINPOINTS = [[32 * i, 32 * j] for i in range(1, 4) for j in range(1, 4)]
VIDEO_TOKEN_ID = 5  # a printable character of the tiny tokenizer, used as the <video> placeholder id
SIZES = [(50, 20), (33, 97), (64, 64), (45, 61)]
# (height, width) alone: wide, tall, square, no multiple of patch or tile, tiny, extreme, just under a tile
SIZES_ALONE = [*SIZES, (7, 9), (1, 300), (300, 1), (97, 33), (31, 31)]


def build_pair(attn_implementation="eager", vision_aspect_ratio="anyres_max_9", vision="siglip", text="qwen2", **kw):
    """The reference and ours from one random tiny config, ours holding the reference's weights."""
    base = tiny_llava_config(vision, text)
    ref_config = LlavaOnevisionConfig(
        vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=vision_aspect_ratio, **kw,
    )
    reference = LlavaOnevisionForConditionalGeneration._from_config(ref_config, attn_implementation=attn_implementation)
    ours = LlavaExtOnevisionForConditionalGeneration._from_config(
        LlavaExtOnevisionConfig(**ref_config.to_dict()), attn_implementation=attn_implementation
    )
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    return reference.eval(), ours.eval()


def processed_batch(reference, prompts, sizes=(), videos=None) -> dict:
    """transformers' PIL image processor's pixels; each `<image>` (`<video>`) expanded to the reference model's
    feature count (transformers' processor cannot be built here without its torchvision video processor).

    `videos` `(num_videos, frames, C, H, W)` go to the `<video>` markers in order."""
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    per_sample, start = [], 0  # one list of images per sample, so that batch_num_images marks multi-image samples
    for prompt in prompts:
        per_sample.append(images[start : start + prompt.count("<image>")])
        start += prompt.count("<image>")
    counts = {"<image>": iter(()), "<video>": iter(())}
    batch = {}
    if images:
        batch.update(image_processor([sample for sample in per_sample if sample], return_tensors="pt"))
        with torch.no_grad():
            features = reference.get_image_features(
                batch["pixel_values"], batch["image_sizes"], batch_num_images=batch["batch_num_images"]
            ).pooler_output
        counts["<image>"] = iter([len(feature) for feature in features])
    if videos is not None:
        batch["pixel_values_videos"] = videos
        counts["<video>"] = iter([video_tokens(videos.shape[1])] * len(videos))
    placeholder_ids = {"<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_TOKEN_ID}
    tokenizer = build_tiny_tokenizer()
    rows = []
    for prompt in prompts:
        row = [1]
        for piece in re.split(r"(<image>|<video>)", prompt):
            if piece in placeholder_ids:
                row += [placeholder_ids[piece]] * next(counts[piece])
            elif piece:
                row += tokenizer(piece, add_special_tokens=False).input_ids
        rows.append(row)
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])  # left-padded
    return {**batch, "input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def video_tokens(frames: int) -> int:
    """A video's placeholders as transformers' LlavaOnevisionProcessor counts them: each frame's p x p patches pooled
    to ceil(p/2)^2, then one newline."""
    return frames * math.ceil(TILE // PATCH / 2) ** 2 + 1


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("vision_aspect_ratio", ["anyres_max_9", "anyres_max_1"])  # _1 shrinks the tile maps
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_images_single_and_multi_match_reference(attn_implementation, vision_aspect_ratio):
    reference, ours = build_pair(attn_implementation, vision_aspect_ratio)
    prompts = ("<image>What is it?", "A <image> and <image>, compare.")
    batch = processed_batch(reference, prompts, SIZES[:3])
    assert batch["batch_num_images"].tolist() == [1, 2]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected, got = reference(**batch, labels=labels), ours(**batch, labels=labels)
    assert (expected.logits - got.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
    assert torch.equal(
        reference.generate(**batch, max_new_tokens=5, do_sample=False),
        ours.generate(**batch, max_new_tokens=5, do_sample=False),
    )


@pytest.mark.parametrize("size", SIZES_ALONE)
def test_each_image_size_alone_matches_reference_and_its_token_count(size):
    reference, ours = build_pair(vision_aspect_ratio="anyres_max_2")  # maps above 2 tiles' worth are shrunk
    batch = processed_batch(reference, ("<image>Describe.",), [size])
    torch.testing.assert_close(logits(ours, batch), logits(reference, batch), rtol=0, atol=1e-4)
    # the count our model checks against is the reference's feature count
    expected_count = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert ours.model.num_image_tokens(batch["image_sizes"], "full", batch["batch_num_images"]) == [expected_count]


def test_mixed_batch_of_three_samples_each_kind_matches_reference():
    """One batch: a single image, three images in one sample, and a video with an image before it."""
    reference, ours = build_pair("sdpa", vision="clip", text="llama", vision_feature_select_strategy="default",
                                 vision_feature_layer=-2)
    prompts = ("<image>One.", "<image><image><image>Three, compare.", "<image>then <video>: what happens?")
    videos = torch.randn(1, 4, 3, TILE, TILE)  # (videos, frames, C, H, W)
    batch = processed_batch(reference, prompts, [SIZES[1], SIZES[0], SIZES[2], SIZES[3], (7, 9)], videos)
    assert batch["batch_num_images"].tolist() == [1, 3, 1]
    with torch.no_grad():
        expected, got = reference(**batch), ours(**batch)
    assert (expected.logits - got.logits).abs().max().item() <= 1e-4
    # the installed release's output fields (image_/video_outputs from 5.24, image_/video_hidden_states before)
    # (5.25's shared multimodal output also has an always-empty audio_outputs, which ours leaves out)
    expected_fields = [field.name for field in dataclasses.fields(expected) if not field.name.startswith("audio_")]
    assert [field.name for field in dataclasses.fields(got)] == expected_fields
    assert all(got[key] is not None for key in expected.keys() if key.startswith(("image_", "video_")))
    assert torch.equal(
        reference.generate(**batch, max_new_tokens=5, do_sample=False),
        ours.generate(**batch, max_new_tokens=5, do_sample=False),
    )


def test_get_image_and_video_features_equal_the_reference():
    reference, ours = build_pair()
    batch = processed_batch(reference, ("<image>One.", "<image> and <image>"), SIZES[:3])
    videos = torch.randn(2, 3, 3, TILE, TILE)
    with torch.no_grad():
        args = (batch["pixel_values"], batch["image_sizes"])
        expected = reference.get_image_features(*args, batch_num_images=batch["batch_num_images"]).pooler_output
        got = ours.get_image_features(*args, batch_num_images=batch["batch_num_images"]).pooler_output
        expected_video = reference.get_video_features(videos).pooler_output
        got_video = ours.get_video_features(videos).pooler_output
    if expected_video.shape[1] == got_video.shape[1] - 1:  # before 5.24 the reference appended the newline in forward
        expected_video = torch.cat((expected_video, reference.model.image_newline.expand(len(videos), 1, -1)), 1)
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    for got_image, expected_image in zip(got, expected):
        torch.testing.assert_close(got_image, expected_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_video, expected_video, rtol=0, atol=1e-5)


def test_video_matches_reference_and_mismatch_is_named():
    reference, ours = build_pair()
    videos = torch.randn(2, 3, 3, TILE, TILE)  # (videos, frames, C, H, W)
    per_video = video_tokens(3)
    row = [1, 40] + [VIDEO_TOKEN_ID] * per_video + [50, 51]
    input_ids = torch.tensor([row, row])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values_videos=videos).logits
        got = ours(input_ids=input_ids, pixel_values_videos=videos).logits
    assert (expected - got).abs().max().item() <= 1e-4
    too_few = input_ids.clone()
    too_few[0, 2] = 40  # one video placeholder of the first sample becomes text
    with pytest.raises(ImageTokenMismatchError, match=rf"{2 * per_video - 1} video tokens.*{2 * per_video} features"):
        ours(input_ids=too_few, pixel_values_videos=videos)


def test_image_token_mismatch_raises_before_the_vision_tower():
    reference, ours = build_pair()
    calls = []
    ours.model.vision_tower.embeddings.register_forward_hook(lambda *args: calls.append(1))
    batch = processed_batch(reference, ("<image>What is it?",), SIZES[3:])
    total = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
    too_few = batch["input_ids"].clone()
    too_few[0, too_few[0].tolist().index(IMAGE_TOKEN_ID)] = 40
    with pytest.raises(ImageTokenMismatchError, match=rf"{total - 1} image tokens.*{total} features"):
        ours(**{**batch, "input_ids": too_few})

    # two images counted as one sample of two (base views only) when each had its own sample: far fewer features
    multi = processed_batch(reference, ("<image>One.", "<image>Two."), SIZES[:2])
    as_one_sample = {**multi, "batch_num_images": torch.tensor([2])}
    with pytest.raises(ValueError, match=r"image tokens.*2 image\(s\) of 50x20, 33x97"):
        ours(**as_one_sample)
    assert calls == []


def test_config_round_trips_the_stock_config_dict_and_rejects_bad_ratio():
    reference, _ = build_pair()
    ours = LlavaExtOnevisionConfig(**reference.config.to_dict())
    assert {**ours.to_dict(), "model_type": "llava_onevision"} == reference.config.to_dict()
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres9'.*'anyres_max_N'"):
        LlavaExtOnevisionConfig(**{**reference.config.to_dict(), "vision_aspect_ratio": "anyres9"})


def _keys(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def test_stock_checkpoints_load_with_equal_logits(tmp_path):
    reference, _ = build_pair()
    batch = processed_batch(reference, ("<image>One.", "<image> and <image>"), SIZES[:3])
    expected = logits(reference, batch)

    reference.save_pretrained(tmp_path / "saved")  # transformers 5.x: the 4.x names on disk
    assert "image_newline" in _keys(tmp_path / "saved")
    in_memory = tmp_path / "in-memory"  # the in-memory 5.x names (model.image_newline, model.language_model.*)
    in_memory.mkdir()
    state = {key: value.contiguous().clone() for key, value in reference.state_dict().items()}
    save_file(state, in_memory / "model.safetensors", metadata={"format": "pt"})
    (in_memory / "config.json").write_text(json.dumps(reference.config.to_dict()))
    assert "model.image_newline" in state

    for directory in (tmp_path / "saved", in_memory):
        ours = LlavaExtOnevisionForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
        assert type(ours.config) is LlavaExtOnevisionConfig
        assert (logits(ours, batch) - expected).abs().max().item() <= 1e-5
        assert torch.equal(ours.model.image_newline, reference.model.image_newline)


def test_ours_save_the_stock_layout_and_load_in_transformers_class(tmp_path):
    reference, ours = build_pair()
    videos = torch.randn(1, 2, 3, TILE, TILE)
    batch = processed_batch(reference, ("<image>One.", "<image> and <video>"), SIZES[:2], videos)
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "reference")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "reference")

    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert (logits(stock.eval(), batch) - logits(reference, batch)).abs().max().item() == 0
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(reloaded) is LlavaExtOnevisionForConditionalGeneration
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


def test_a_stock_config_builds_our_model_with_the_stock_layout(tmp_path):
    reference, _ = build_pair()
    ours = LlavaExtOnevisionForConditionalGeneration(reference.config)  # a transformers LlavaOnevisionConfig
    assert type(ours.config) is LlavaExtOnevisionConfig and type(ours.model) is LlavaExtOnevisionModel
    ours.load_state_dict(reference.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "reference")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "reference")


def test_trust_remote_code_round_trip_without_llava_ext(tmp_path):
    reference, ours = build_pair("sdpa")  # the attention the remote load picks by default
    batch = processed_batch(reference, ("<image>One.", "<image><image> then <video>"), SIZES[:3],
                            torch.randn(1, 2, 3, TILE, TILE))
    ours.save_pretrained(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_llava_ext_onevision.LlavaExtOnevisionModel"
    )
    torch.save(batch, tmp_path / "inputs.pt")
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    shipped = sorted(path.name for path in (tmp_path / "checkpoint").glob("*.py"))
    assert shipped == [
        "anyres.py", "configuration_llava_ext.py", "configuration_llava_ext_next.py",
        "configuration_llava_ext_onevision.py", "modeling_llava_ext.py", "modeling_llava_ext_next.py",
        "modeling_llava_ext_onevision.py", "vision.py",
    ]
    assert result["classes"] == [
        "LlavaExtOnevisionConfig", "LlavaExtOnevisionForConditionalGeneration", "LlavaExtOnevisionModel"
    ]
    assert result["modules"] == ["transformers_modules"]  # the checkpoint's copy, not an installed llava_ext
    torch.testing.assert_close(result["logits"], logits(ours, batch), rtol=0, atol=1e-5)
    assert torch.equal(result["tokens"], ours.generate(**batch, max_new_tokens=5, do_sample=False))


def test_get_video_features_takes_either_name_of_the_frames():
    """5.17's reference names the frames `pixel_values`, 5.2x's `pixel_values_videos`: ours takes both, and refuses
    both at once or neither."""
    reference, ours = build_pair()
    videos = torch.randn(2, 3, 3, TILE, TILE)
    with torch.no_grad():
        by_position = ours.get_video_features(videos).pooler_output
        for model in (ours, ours.model):
            torch.testing.assert_close(model.get_video_features(pixel_values=videos).pooler_output, by_position)
            torch.testing.assert_close(model.get_video_features(pixel_values_videos=videos).pooler_output, by_position)
    with pytest.raises(TypeError, match="twice"):
        ours.get_video_features(videos, pixel_values=videos)
    with pytest.raises(TypeError, match="pixel_values_videos"):
        ours.get_video_features()


def test_a_loaded_base_model_saves_the_keys_a_new_one_saves(tmp_path):
    reference, _ = build_pair()
    from transformers import LlavaOnevisionModel

    LlavaOnevisionModel(reference.config).save_pretrained(tmp_path / "stock")
    LlavaExtOnevisionModel(reference.config).save_pretrained(tmp_path / "new")
    LlavaExtOnevisionModel.from_pretrained(tmp_path / "new").save_pretrained(tmp_path / "again")
    assert _keys(tmp_path / "new") == _keys(tmp_path / "again") == _keys(tmp_path / "stock")
