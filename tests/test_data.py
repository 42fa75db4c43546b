"""Dataset formats, lazy/named image errors, and the collator's assistant-only labels for every chat template.

Expected labels are derived here from the rendered string alone: find each answer (and the end-of-turn marker the
format puts after it) by character offset, expand `<image>` by hand and map characters to the character-level tokens.
"""

import json
import re
import string
import warnings

import pytest
from conftest import (
    BOS_ID, IMAGE_TOKEN_ID, NUM_PATCHES, PAD_ID, build_tiny_tokenizer, needs_image_assistant_masks,
)
from PIL import Image
from torch.utils.data import DataLoader

from llava_ext.data import LlavaConversationDataset, LlavaExtDataCollator, SampleError, skip_summary
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
    """Char-level tokenization of `rendered` with `<image>` x NUM_PATCHES; labels keep answer + end marker chars.

    One BOS: the one the template renders ("<s>" first), else the one the tokenizer adds.
    """
    trained = [False] * len(rendered)
    cursor = 0
    for answer in answers:
        start = rendered.index(answer + end, cursor)
        cursor = start + len(answer + end)
        trained[start:cursor] = [True] * (cursor - start)
    ids, labels, position = ([], [], 0) if rendered.startswith("<s>") else ([BOS_ID], [-100], 0)
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
        assert rendered.startswith("<s>") == (template != "chatml")  # only ChatML has no BOS of its own
        assert batch["input_ids"][row, :length].tolist() == ids
        assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
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
    with pytest.raises(SampleError, match=r"Record 2 \(id 's3'\): cannot read image .*missing\.png.*'skip' to leave"):
        dataset[2]

    skipping = LlavaConversationDataset(path, image_folder=tmp_path / "imgs", on_bad_sample="skip")
    with pytest.warns(UserWarning, match=r"Skipping a sample: Record 2 \(id 's3'\)"):
        items = [skipping[i] for i in range(3)]
    assert items[2] is None
    batch = LlavaExtDataCollator(make_processor())(items)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    assert [(sample.index, sample.id) for sample in skipping.skipped_samples()] == [(2, "s3")]


def test_unreadable_image_and_placeholder_mismatch_are_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    records = [{"id": "broken", "image": "bad.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(SampleError, match=r"Record 0 \(id 'broken'\): cannot read image .*UnidentifiedImageError"):
        LlavaConversationDataset(tmp_path / "d.json")[0]

    records[0]["conversations"][0]["value"] = "no placeholder"
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(SampleError, match=r"Record 0 \(id 'broken'\) lists 1 image\(s\) but its text has 0 '<image>'"):
        LlavaConversationDataset(tmp_path / "d.json")


def test_lengths_estimate_orders_by_size(tmp_path):
    path = write_data(tmp_path, "llava")
    lengths = LlavaConversationDataset(path, tokens_per_image=16).lengths
    assert lengths == [2 + 1 + 16, 1 + 1, 1 + 1 + 16]  # words + tokens_per_image per image


def llava_record(sample_id, image=None, question="<image>\nWhat?"):
    record = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]}
    if image is not None:
        record["image"] = image
    return record


@pytest.mark.parametrize("written", ["../outside.png", "ABSOLUTE", "sub/../../outside.png", "sub/../inside.png"])
def test_image_paths_leaving_image_folder_are_refused_unless_allowed(tmp_path, written):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    image().save(tmp_path / "outside.png")
    image().save(folder / "inside.png")
    written = str(tmp_path / "outside.png") if written == "ABSOLUTE" else written  # /etc/passwd-style
    records = [llava_record("ok", "inside.png"), llava_record("bad", written), llava_record("bad2", written)]
    (folder / "d.json").write_text(json.dumps(records))
    message = (rf"Record 1 \(id 'bad'\) of .*d\.json' has image '{re.escape(written)}', which is outside "
               r"image_folder=.* \(and 1 more image paths do\)\..*allow_images_outside_folder=True")
    for on_bad_sample in ("raise", "skip"):  # a policy, not a bad sample: skipping would hide a whole misplaced set
        with pytest.raises(ValueError, match=message):
            LlavaConversationDataset(folder / "d.json", on_bad_sample=on_bad_sample)
    trusting = LlavaConversationDataset(folder / "d.json", allow_images_outside_folder=True)
    assert trusting[1]["messages"][0]["content"][0]["image"].size == (40, 36)


def test_paths_inside_image_folder_and_symlinks_out_of_it_are_accepted(tmp_path):
    """Absolute paths below the folder pass; a symlink the user put in the folder is followed (documented choice)."""
    folder, elsewhere = tmp_path / "images", tmp_path / "mounted"
    folder.mkdir()
    elsewhere.mkdir()
    image((0, 0, 255)).save(elsewhere / "a.png")
    (folder / "coco").symlink_to(elsewhere, target_is_directory=True)
    records = [llava_record("linked", "coco/a.png"), llava_record("absolute", str(folder / "coco" / "a.png"))]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = LlavaConversationDataset(tmp_path / "d.json", image_folder=folder)
    assert [dataset[i]["messages"][0]["content"][0]["image"].getpixel((0, 0)) for i in range(2)] == [(0, 0, 255)] * 2


MALFORMED = {
    "not an object": (["x"], r"is \['x'\], not a JSON object"),
    "no format": ({"id": "bad", "text": "hi"}, r"has keys \['id', 'text'\]; expected"),
    "conversations a string": ({"id": "bad", "conversations": "hi"}, r"'conversations' is 'hi'; give a list"),
    "turn without value": ({"id": "bad", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
                           r"a 'human' turn has value=None"),
    "value not a string": ({"id": "bad", "conversations": [{"from": "human", "value": 3}]}, r"turn has value=3"),
    "unknown speaker": ({"id": "bad", "conversations": [{"from": ["human"], "value": "q"}]},
                        r"a turn has from=\['human'\]; the LLaVA format uses"),
    "image not a path": (dict(llava_record("bad"), image=5), r"'image' is 5; give an image path"),
    "unknown role": ({"id": "bad", "messages": [{"role": "bot", "content": "x"}]}, r"role='bot'; use one of"),
    "bad content": ({"id": "bad", "messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
                    r"a message's content is 7; give a string"),
    "bad block": ({"id": "bad", "messages": [{"role": "user", "content": [{"type": "video"}]},
                                             {"role": "assistant", "content": "x"}]}, r"content block .*'video'"),
    "image in answer": ({"id": "bad", "images": ["a.png"], "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>\nx"}]},
        r"an? 'assistant' message holds an image"),
    "no answer": ({"id": "bad", "conversations": [{"from": "human", "value": "q"}]}, r"has no assistant turn"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_stops_naming_it_or_is_skipped_and_counted(tmp_path, case):
    record, reason = MALFORMED[case]
    records = [llava_record("good", question="Hi"), record, llava_record("good2", question="Ho")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    record_id = "1" if case == "not an object" else "bad"  # a record without an id is named by its position
    with pytest.raises(SampleError, match=rf"^Record 1 \(id '{record_id}'\).*{reason}.*Fix the record in .*'skip'"):
        LlavaConversationDataset(tmp_path / "d.json")

    with pytest.warns(UserWarning, match=rf"Skipping malformed records .*skipped 1 of 3 samples: record 1 .*{reason}"):
        dataset = LlavaConversationDataset(tmp_path / "d.json", on_bad_sample="skip")
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["good", "good2"]
    (skipped,) = dataset.skipped_samples()
    assert (skipped.index, skipped.id) == (1, record_id)
    assert re.search(reason, skipped.reason) and not skipped.reason.startswith("Record")


def test_nothing_usable_and_bad_json_are_named(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a"}, {"id": "b"}]))
    with pytest.raises(ValueError, match=r"has no usable sample \(2 records, skipped 2 of 2 samples: record 0"):
        with pytest.warns(UserWarning, match="Skipping malformed records"):
            LlavaConversationDataset(tmp_path / "d.json", on_bad_sample="skip")
    (tmp_path / "d.jsonl").write_text(json.dumps(llava_record("a")) + "\n\n{'id': 'b'}\n")
    with pytest.raises(ValueError, match=r"d\.jsonl' line 3 is not valid JSON"):
        LlavaConversationDataset(tmp_path / "d.jsonl")
    (tmp_path / "e.json").write_text('[{"id": "a"},\n {"id": }]')
    with pytest.raises(ValueError, match=r"e\.json' is not valid JSON \(Expecting value, line 2 column 9\)"):
        LlavaConversationDataset(tmp_path / "e.json")


def identity(items):
    return items


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skips_in_dataloader_workers_are_counted_once_each(tmp_path, num_workers):
    """Workers flag skips in shared memory: the main process counts each bad sample once, over two epochs."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [llava_record(f"text{i}", question="Hi") for i in range(5)]
    records.insert(1, llava_record("gone", "missing.png"))
    records.insert(3, {"id": "malformed", "conversations": [{"from": "bot", "value": "x"}]})
    records.insert(5, llava_record("unreadable", "broken.png"))
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="Skipping malformed records"):
        dataset = LlavaConversationDataset(tmp_path / "d.json", on_bad_sample="skip")
    collator = LlavaExtDataCollator(make_processor())
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=identity)
    rows = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-sample warnings come from the workers
        for _ in range(2):
            for items in loader:
                rows += collator(items)["input_ids"].shape[0]
    assert rows == 2 * 5
    skipped = dataset.skipped_samples()
    assert [(sample.index, sample.id) for sample in skipped] == [(1, "gone"), (3, "malformed"), (5, "unreadable")]
    assert "FileNotFoundError" in skipped[0].reason and "UnidentifiedImageError" in skipped[2].reason
    summary = skip_summary(skipped, dataset.num_records, shown=2)
    assert summary.startswith("skipped 3 of 8 samples: record 1 (id 'gone'): cannot read image ")
    assert "; record 3 (id 'malformed'): a turn has from='bot'" in summary and summary.endswith("; and 1 more")
