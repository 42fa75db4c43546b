"""Dataset formats, lazy/named image errors, and the collator's assistant-only labels for every chat template.

Expected labels are derived here from the rendered string alone: find each answer (and the end-of-turn marker the
format puts after it) by character offset, expand `<image>` by hand and map characters to the character-level tokens.
"""

import json
import string

import pytest
from conftest import (
    BOS_ID, IMAGE_TOKEN_ID, NUM_PATCHES, PAD_ID, build_tiny_tokenizer, needs_image_assistant_masks,
)
from PIL import Image

from llava_ext.data import LlavaConversationDataset, LlavaExtDataCollator, SampleError
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor
from llava_ext.processing_llava_ext import LlavaExtProcessor

# The end-of-turn marker each format writes right after an assistant answer (from the formats' published definitions).
END_OF_ANSWER = {"llava-1.5": "</s>", "mistral": "</s>", "chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}
SPECIAL_STRINGS = {"<s>": BOS_ID, "</s>": 2, "<image>": IMAGE_TOKEN_ID}
CHARS = string.printable[:95] + "\n"  # conftest's vocabulary after the 5 special tokens


def make_processor(template: str = "llava-1.5") -> LlavaExtProcessor:
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaExtProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=8,
        vision_feature_select_strategy="default", chat_template=template, num_additional_image_tokens=1,
    )


def image(color=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (40, 36), color)


def user(*blocks):
    return {"role": "user", "content": [b if isinstance(b, dict) else {"type": "text", "text": b} for b in blocks]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


SAMPLES = [
    {"id": "two-images", "messages": [user({"type": "image", "image": image()}, {"type": "image", "image": image((0, 0, 255))},
                                           "Compare them."), assistant("Red vs blue.")]},
    {"id": "text-only", "messages": [user("Hi?"), assistant("Hello!"), user("More?"), assistant("No.")]},
    {"id": "one-image-multiturn", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        user({"type": "image", "image": image()}, "Color?"), assistant("red"), user("Sure?"), assistant("yes, red")]},
]


def expected_ids_and_labels(rendered: str, answers: list[str], end: str) -> tuple[list[int], list[int]]:
    """Char-level tokenization of `rendered` with `<image>` x NUM_PATCHES; labels keep answer + end marker chars."""
    trained = [False] * len(rendered)
    cursor = 0
    for answer in answers:
        start = rendered.index(answer + end, cursor)
        cursor = start + len(answer + end)
        trained[start:cursor] = [True] * (cursor - start)
    ids, labels, position = [BOS_ID], [-100], 0
    while position < len(rendered):
        special = next((s for s in SPECIAL_STRINGS if rendered.startswith(s, position)), None)
        if special == "<image>":
            ids += [IMAGE_TOKEN_ID] * NUM_PATCHES
            labels += [-100] * NUM_PATCHES
            position += len(special)
            continue
        piece = special or rendered[position]
        token = SPECIAL_STRINGS[special] if special else 5 + CHARS.index(piece)
        ids.append(token)
        labels.append(token if trained[position] else -100)
        position += len(piece)
    return ids, labels


@pytest.mark.parametrize("template", sorted(END_OF_ANSWER))
@needs_image_assistant_masks
def test_collator_trains_exactly_the_answers_and_end_marker(template):
    processor = make_processor(template)
    batch = LlavaExtDataCollator(processor)(SAMPLES)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # two images + one, in sample order
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) == 3, "samples of different lengths"
    for row, sample in enumerate(SAMPLES):
        rendered = processor.apply_chat_template(sample["messages"], tokenize=False)
        answers = [m["content"][0]["text"] for m in sample["messages"] if m["role"] == "assistant"]
        ids, labels = expected_ids_and_labels(rendered, answers, END_OF_ANSWER[template])
        length = lengths[row]
        assert batch["input_ids"][row, :length].tolist() == ids
        assert batch["labels"][row, :length].tolist() == labels
        # right padding: pad ids, no attention, no loss
        assert batch["input_ids"][row, length:].eq(PAD_ID).all()
        assert batch["attention_mask"][row, :length].eq(1).all() and batch["attention_mask"][row, length:].eq(0).all()
        assert batch["labels"][row, length:].eq(-100).all()
    assert not batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID].ne(-100).any()


def test_collator_text_only_batch_has_no_pixel_values():
    batch = LlavaExtDataCollator(make_processor())([SAMPLES[1]])
    assert "pixel_values" not in batch
    assert batch["labels"].ne(-100).sum() == len("Hello!</s>") - len("</s>") + 1 + len("No.") + 1


@needs_image_assistant_masks
def test_truncation_keeps_image_tokens_or_rejects():
    processor = make_processor()
    sample = SAMPLES[2]
    full = LlavaExtDataCollator(processor)([sample])["input_ids"].shape[1]
    cut = LlavaExtDataCollator(processor, model_max_length=full - 5)([sample])
    assert cut["input_ids"].shape[1] == full - 5
    assert cut["input_ids"].eq(IMAGE_TOKEN_ID).sum() == NUM_PATCHES

    with pytest.raises(SampleError, match=r"one-image-multiturn.*past model_max_length=20.*Raise model_max_length"):
        LlavaExtDataCollator(processor, model_max_length=20)([sample])
    dropping = LlavaExtDataCollator(processor, model_max_length=20, on_overlong="drop")
    with pytest.warns(UserWarning, match="Dropping a sample"):
        batch = dropping([sample, SAMPLES[1]])
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch


def write_data(tmp_path, fmt: str):
    (tmp_path / "imgs").mkdir()
    image((0, 255, 0)).save(tmp_path / "imgs" / "a.png")
    if fmt == "llava":
        records = [
            {"id": "s1", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "green"}]},
            {"id": "s2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "s3", "image": "missing.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        ]
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
    else:
        records = [
            {"id": "s1", "images": ["a.png"], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": "green"}]},
            {"id": "s2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"id": "s3", "images": ["missing.png"], "messages": [
                {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "x"}]},
        ]
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps(record) for record in records))
    return path


@pytest.mark.parametrize("fmt", ["llava", "messages"])
@needs_image_assistant_masks
def test_dataset_formats_lazy_images_and_named_errors(tmp_path, fmt):
    path = write_data(tmp_path, fmt)
    dataset = LlavaConversationDataset(path, image_folder=tmp_path / "imgs")  # a missing image is not opened yet
    assert len(dataset) == 3
    first = dataset[0]
    assert first["messages"][0]["content"][0]["type"] == "image"
    assert first["messages"][0]["content"][0]["image"].size == (40, 36)
    assert first["messages"][0]["content"][1] == {"type": "text", "text": "What color?"}
    assert first["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "green"}]}
    assert dataset[1]["messages"][0]["content"] == [{"type": "text", "text": "Hi"}]
    with pytest.raises(SampleError, match=r"Sample 's3'.*missing\.png.*on_bad_sample='skip'"):
        dataset[2]

    skipping = LlavaConversationDataset(path, image_folder=tmp_path / "imgs", on_bad_sample="skip")
    with pytest.warns(UserWarning, match="Skipping a sample: Sample 's3'"):
        items = [skipping[i] for i in range(3)]
    assert items[2] is None
    batch = LlavaExtDataCollator(make_processor())(items)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1


def test_unreadable_image_and_placeholder_mismatch_are_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    records = [{"id": "broken", "image": "bad.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(SampleError, match="Sample 'broken': cannot read image"):
        LlavaConversationDataset(tmp_path / "d.json")[0]

    records[0]["conversations"][0]["value"] = "no placeholder"
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(SampleError, match=r"'broken' lists 1 image\(s\) but its text has 0 '<image>'"):
        LlavaConversationDataset(tmp_path / "d.json")


def test_lengths_estimate_orders_by_size(tmp_path):
    path = write_data(tmp_path, "llava")
    lengths = LlavaConversationDataset(path, tokens_per_image=16).lengths
    assert lengths == [2 + 1 + 16, 1 + 1, 1 + 1 + 16]  # words + tokens_per_image per image
