"""LlavaExtProcessor: parity with transformers' LlavaProcessor, named errors, remote-code round trip, pipeline."""

import ast
import json
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import BOS_ID, HANG_GUARD_S, IMAGE_TOKEN_ID, PAD_ID, build_tiny_tokenizer, isolated_env, tiny_llava_config
from transformers import LlamaTokenizer, LlavaImageProcessorPil, LlavaProcessor, pipeline

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, LlavaExtImageProcessor, LlavaExtProcessor

SETTINGS = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
CLIP = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def image(seed: int, height: int = 40, width: int = 60) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# What the shipped remote code may import (transformers through its top-level package only) besides its sibling files
REMOTE_CODE_IMPORTS = {"os", "itertools", "collections", "typing", "pathlib", "numpy", "PIL", "torch", "transformers"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, indented imports included; relative ones keep their leading dots."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    return modules


def processors(**kwargs) -> tuple[LlavaExtProcessor, LlavaProcessor]:
    tokenizer = build_tiny_tokenizer()
    ours = LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), tokenizer, **CLIP, **kwargs)
    reference = LlavaProcessor(LlavaImageProcessorPil(**SETTINGS), tokenizer, **CLIP, **kwargs)
    return ours, reference


BATCH_TEXT = ["USER: <image>\n<image>\nWhich is red? ASSISTANT:", "USER: <image>\nHi ASSISTANT:"]


def batch_images():
    return [[image(0), image(1, 50, 30)], [image(2, 32, 32)]]


def test_batched_left_padded_multi_image_equals_transformers():
    ours, reference = processors()
    expected = reference(images=batch_images(), text=BATCH_TEXT, padding=True, return_tensors="pt")
    actual = ours(images=batch_images(), text=BATCH_TEXT, padding=True, return_tensors="pt")
    assert set(actual) == set(expected) == {"input_ids", "attention_mask", "pixel_values"}
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    # CLIP, strategy "default": (32 / 8)^2 patches + CLS - CLS = 16 tokens per image
    assert (actual["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [32, 16]
    assert actual["input_ids"][1, 0] == PAD_ID and actual["attention_mask"][1, 0] == 0  # left padding
    assert actual["pixel_values"].shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    "kwargs, tokens_per_image",
    [(dict(vision_feature_select_strategy="full"), 17), (dict(num_additional_image_tokens=0), 15)],
)
def test_token_count_follows_strategy_and_cls(kwargs, tokens_per_image):
    settings = {**CLIP, **kwargs}
    processor = LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), build_tiny_tokenizer(), **settings)
    out = processor(images=image(0), text="<image>x", return_tensors="pt")
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == tokens_per_image


def test_single_sample_and_mm_token_type_ids_equal_transformers():
    ours, reference = processors()
    kwargs = dict(images=image(3), text="USER: <image>\nWhat? ASSISTANT:", return_mm_token_type_ids=True)
    expected, actual = reference(**kwargs), ours(**kwargs)  # no return_tensors: lists, as the reference
    assert actual["input_ids"] == expected["input_ids"]
    assert actual["mm_token_type_ids"] == expected["mm_token_type_ids"]
    assert actual["mm_token_type_ids"][0] == [int(i == IMAGE_TOKEN_ID) for i in actual["input_ids"][0]]
    np.testing.assert_array_equal(np.asarray(actual["pixel_values"]), np.asarray(expected["pixel_values"]))


def test_apply_chat_template_tokenized_equals_transformers(tmp_path):
    path = tmp_path / "cat.png"
    image(7).save(path)
    conversation = [
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": image(8)}]},
    ]
    ours, _ = processors()
    _, reference = processors(chat_template=ours.chat_template)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    actual = ours.apply_chat_template(conversation, **kwargs)
    expected = reference.apply_chat_template(conversation, **kwargs)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(actual[key], expected[key]), key
    # the image loaded from the path is the saved one: same pixels as processing the PIL image itself
    pixels = LlavaImageProcessorPil(**SETTINGS)([image(7), image(8)], return_tensors="pt").pixel_values
    assert torch.equal(actual["pixel_values"], pixels)
    assert (actual["input_ids"] == IMAGE_TOKEN_ID).sum() == 32


BOS_LINE = "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}\n"  # how the bundled templates render the BOS


def test_a_rendered_bos_is_the_only_bos_as_transformers_gives_without_it():
    ours, reference = processors()
    expected = reference(images=batch_images(), text=BATCH_TEXT, padding=True, return_tensors="pt")
    rendered = ["<s>" + text for text in BATCH_TEXT]  # as the llava-1.5 template renders them
    doubled = reference(images=batch_images(), text=rendered, padding=True, return_tensors="pt")
    assert doubled["input_ids"].eq(BOS_ID).sum(dim=1).tolist() == [2, 2]  # LlavaProcessor adds a second BOS
    for texts, kwargs in [
        (rendered, {}),
        ([rendered[0], BATCH_TEXT[1]], {}),  # one BOS rendered, one left to the tokenizer
        (rendered, {"add_special_tokens": True}),
        (rendered, {"add_special_tokens": False}),  # as TRL and apply_chat_template(tokenize=True) call it
        (rendered, {"text_kwargs": {"add_special_tokens": False}}),
    ]:
        actual = ours(images=batch_images(), text=texts, padding=True, return_tensors="pt", **kwargs)
        assert set(actual) == set(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (texts, kwargs, key)
    assert actual["input_ids"].eq(BOS_ID).sum(dim=1).tolist() == [1, 1]
    # add_special_tokens=False with the BOS on one sample only: read literally, as LlavaProcessor reads it
    mixed = dict(text=[rendered[0], BATCH_TEXT[1]], padding=True, return_tensors="pt", add_special_tokens=False)
    actual, literal = ours(images=batch_images(), **mixed), reference(images=batch_images(), **mixed)
    assert torch.equal(actual["input_ids"], literal["input_ids"])
    assert actual["input_ids"].eq(BOS_ID).sum(dim=1).tolist() == [1, 0]


def test_offsets_of_a_rendered_bos_sample_index_the_text_as_given():
    ours, reference = processors()
    texts = ["<s>USER: Hi", "USER: Yo!"]
    for return_tensors in (None, "pt"):
        out = ours(text=texts, padding=True, return_offsets_mapping=True, return_tensors=return_tensors)
        for text, offsets in zip(texts, out["offset_mapping"]):
            pieces = [text[start:end] for start, end in offsets if end > start]
            assert pieces == list(text.removeprefix("<s>")), return_tensors  # one character token each
    literal = reference(text=texts[0], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][0]
    assert literal[0] == (0, 3)  # the "<s>" written in the text; here the tokenizer's BOS, zero-width
    assert ours(text=texts[0], return_offsets_mapping=True)["offset_mapping"][0] == [(0, 0)] + literal[1:]


def test_a_tokenizer_that_adds_no_bos_reads_a_rendered_bos_as_is():
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = None  # no BOS of its own, as e.g. add_bos_token=False
    ours = LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), tokenizer, **CLIP)
    reference = LlavaProcessor(LlavaImageProcessorPil(**SETTINGS), tokenizer, **CLIP)
    for text in ("<s>USER: Hi", "USER: Hi"):
        assert ours(text=text)["input_ids"] == reference(text=text)["input_ids"]
    assert ours(text="<s>USER: Hi")["input_ids"][0][:2] == [BOS_ID, 5 + string.printable.index("U")]


def metaspace_first_tokenizer() -> LlamaTokenizer:
    """transformers' LlamaTokenizer with `legacy=False` over single characters: it writes the word-start marker '▁'
    only at the very start of a text (Metaspace prepend_scheme="first"), so "<s>USER" read literally loses it."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    vocab.update({char: len(vocab) + index for index, char in enumerate(string.printable[:95] + "\n▁")})
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], legacy=False, add_bos_token=True, pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def test_a_rendered_bos_keeps_the_first_words_marker_that_literal_tokenization_drops():
    tokenizer = metaspace_first_tokenizer()
    ours = LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), tokenizer, **CLIP)
    reference = LlavaProcessor(LlavaImageProcessorPil(**SETTINGS), tokenizer, **CLIP)
    bos, marker, u = tokenizer.convert_tokens_to_ids(["<s>", "▁", "U"])
    text = "USER: <image>\nHi ASSISTANT:"
    expected = reference(images=image(0), text=text)["input_ids"]
    assert expected[0][:3] == [bos, marker, u]  # the BOS the tokenizer adds, then "▁USER"
    literal = reference(images=image(0), text="<s>" + text, add_special_tokens=False)["input_ids"]
    assert literal[0][:2] == [bos, u]  # LlavaProcessor on the rendered BOS: "USER" without its "▁"
    for kwargs in ({}, {"add_special_tokens": False}):
        assert ours(images=image(0), text="<s>" + text, **kwargs)["input_ids"] == expected, kwargs

    # training (apply_chat_template's ids and mask) and chat (processor(text=rendered)) agree with the template
    # without a BOS line, on which LlavaProcessor leaves the BOS to the tokenizer
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    assert ours.chat_template.count(BOS_LINE) == 1
    reference.chat_template = ours.chat_template.replace(BOS_LINE, "")
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    actual = ours.apply_chat_template(conversation, **kwargs)
    expected = reference.apply_chat_template(conversation, **kwargs)
    assert actual["input_ids"] == expected["input_ids"] and actual["input_ids"][0][:3] == [bos, marker, u]
    assert actual["assistant_masks"] == expected["assistant_masks"]
    answer = [i for i, masked in zip(actual["input_ids"][0], actual["assistant_masks"][0]) if masked]
    assert tokenizer.decode(answer) == "Yes.</s>"
    rendered = ours.apply_chat_template(conversation)
    assert rendered.startswith("<s>USER: ")
    assert ours(text=rendered)["input_ids"] == actual["input_ids"]


def test_marker_image_count_mismatch_names_both_counts():
    ours, _ = processors()
    with pytest.raises(ValueError, match=r"2 '<image>' markers \(per sample: \[1, 1\]\) but 1 images were given"):
        ours(images=[image(0)], text=["<image>a", "<image>b"], padding=True)
    with pytest.raises(ValueError, match=r"1 '<image>' markers \(per sample: \[1\]\) but 0 images were given"):
        ours(text="USER: <image>\nHi")
    with pytest.raises(ValueError, match=r"0 '<image>' markers \(per sample: \[0\]\) but 1 images were given"):
        ours(images=image(0), text="USER: no marker")


def test_truncation_that_cuts_image_tokens_says_so():
    ours, _ = processors()
    with pytest.raises(ValueError, match=r"Truncation would cut image tokens: sample 0 has 16 image tokens.*"
                                         r"Raise max_length to at least 22"):
        ours(images=image(0), text="<image>Hello", truncation=True, max_length=10)
    kept = ours(images=image(0), text="<image>Hello", truncation=True, max_length=22)  # BOS + 16 + 5 chars fits
    assert len(kept["input_ids"][0]) == 22


def test_missing_patch_size_is_named_before_processing():
    processor = LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), build_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"patch_size is None.*patch_size=config.vision_config.patch_size"):
        processor(images=image(0), text="<image>")


def test_bad_image_path_is_named(tmp_path):
    ours, _ = processors()
    with pytest.raises(ValueError, match=r"Image 1 \('.*missing\.png'\) is not an existing file"):
        ours(images=[image(0), str(tmp_path / "missing.png")], text="<image><image>")


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import numpy as np, PIL.Image
    from transformers import AutoProcessor

    checkpoint, out_path = sys.argv[1:]
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = processor(images=PIL.Image.fromarray(pixels), text="<s>USER: <image>\\nHi ASSISTANT:")  # one BOS, as below
    try:
        processor(images=[], text="<image>")
        error = None
    except ValueError as e:
        error = str(e)
    json.dump({
        "processor": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "modules": sorted({type(o).__module__.split(".")[0] for o in (processor, processor.image_processor)}),
        "input_ids": out["input_ids"],
        "pixel_values": np.asarray(out["pixel_values"]).tolist(),
        "chat_template": processor.chat_template,
        "error": error,
    }, open(out_path, "w"))
    """
)


def test_auto_processor_trust_remote_code_without_llava_ext(tmp_path):
    ours, _ = processors()
    ours.save_pretrained(tmp_path / "checkpoint")
    code = {path.name for path in (tmp_path / "checkpoint").glob("*.py")}
    assert {"processing_llava_ext.py", "image_processing_llava_ext.py"} <= code
    for name in ("processing_llava_ext.py", "image_processing_llava_ext.py"):  # only what a user has to trust
        modules = imported_modules(tmp_path / "checkpoint" / name)
        relative = {module for module in modules if module.startswith(".")}
        # transformers' submodules are internals that move between releases; its top-level names are the stable API
        assert not {module for module in modules if module.startswith("transformers.")}, name
        assert {module.split(".")[0] for module in modules - relative} <= REMOTE_CODE_IMPORTS, name
        assert {module.removeprefix(".") + ".py" for module in relative} <= code, name  # siblings saved beside it
    expected = ours(images=PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)),
                    text="USER: <image>\nHi ASSISTANT:")

    env = isolated_env(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "out.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["processor"] == "LlavaExtProcessor"
    assert result["image_processor"] == "LlavaExtImageProcessor"
    assert result["modules"] == ["transformers_modules"]  # the checkpoint's copy, not an installed llava_ext
    assert result["input_ids"] == expected["input_ids"]
    np.testing.assert_allclose(result["pixel_values"], np.asarray(expected["pixel_values"]), atol=1e-6)
    assert result["chat_template"].startswith("{#- LLaVA-1.5 (Vicuna v1")
    assert "1 '<image>' markers" in result["error"] and "but 0 images were given" in result["error"]


def test_pipeline_answers_a_chat_like_generate(tmp_path):
    torch.manual_seed(0)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()
    processor, _ = processors()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image", "image": image(5)}, {"type": "text", "text": "Hi?"}]}]
    # only character tokens (no pad/BOS/EOS/<image>, no ids past the tokenizer's 101), so each decodes to one char
    suppress = list(range(5)) + list(range(len(processor.tokenizer), model.config.text_config.vocab_size))
    generate_kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=suppress)

    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    answer = pipe(text=messages, generate_kwargs=generate_kwargs, return_full_text=False)[0]["generated_text"]

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, **generate_kwargs)[0, inputs["input_ids"].shape[1]:]
    assert len(generated) == 6 and len(answer) == 6
    assert answer == processor.decode(generated, skip_special_tokens=True)
    assert processor.tokenizer(answer, add_special_tokens=False)["input_ids"] == generated.tolist()


def test_image_assistant_masks_are_refused_where_transformers_would_misalign_them(monkeypatch):
    from transformers.processing_utils import ProcessorMixin

    processor, _ = processors()
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image(0)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
    ]
    monkeypatch.delattr(ProcessorMixin, "_adjust_assistant_masks_indices", raising=False)  # as transformers 5.17
    with pytest.raises(ValueError, match="misaligns the mask after image-token expansion"):
        processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_size=0), r"patch_size=0 is not a positive int; pass the tower's config.vision_config.patch_size"),
        (dict(vision_feature_select_strategy="cls"), r"vision_feature_select_strategy='cls' is not one of 'default'"),
        (dict(num_additional_image_tokens=-1), r"num_additional_image_tokens=-1 is not an int >= 0"),
    ],
)
def test_tower_settings_are_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), build_tiny_tokenizer(), **{**CLIP, **kwargs})


def test_a_crop_smaller_than_a_patch_is_named_instead_of_dropping_the_image_tokens():
    # (32 // 64)^2 patches + 0 - 1: the '<image>' marker used to vanish from the text without a word
    processor = LlavaExtProcessor(LlavaExtImageProcessor(**SETTINGS), build_tiny_tokenizer(), patch_size=64,
                                  vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match=r"A 32x32 image gives -1 image tokens with patch_size=64, "
                                         r"num_additional_image_tokens=0 .* Raise crop_size"):
        processor(images=image(0), text="<image>Hi")


@pytest.mark.parametrize(
    "text, error, message",
    [
        ([], ValueError, r"text is an empty list; pass a string or a non-empty list of strings"),
        (["<image>", 7], TypeError, r"text\[1\] has type int, not str"),
        (123, TypeError, r"text has type int; pass a string or a list of strings"),
    ],
)
def test_text_that_is_not_strings_is_named(text, error, message):
    ours, _ = processors()
    with pytest.raises(error, match=message):
        ours(images=[image(0)], text=text)


def test_per_sample_image_lists_must_match_each_samples_markers():
    ours, _ = processors()
    # totals agree (2 and 2) but sample 0's second image would be spliced into sample 1's marker
    with pytest.raises(ValueError, match=r"Sample 0 has 2 '<image>' markers but its image list has 1 images "
                                         r"\(markers per sample: \[2, 0\], images per sample: \[1, 1\]\)"):
        ours(images=[[image(0)], [image(1)]], text=["<image><image>", "no image"], padding=True)
    with pytest.raises(ValueError, match=r"images has 3 per-sample lists but the text has 2 samples"):
        ours(images=[[image(0)], [image(1)], []], text=["<image>", "<image>"], padding=True)


def test_empty_image_lists_are_a_text_only_batch():
    ours, _ = processors()
    for images in ([], [[], []]):
        out = ours(images=images, text=["Hi", "Yo"], padding=True, return_tensors="pt")
        assert "pixel_values" not in out and out["input_ids"].shape == (2, 3)


def test_a_grey_2d_array_is_one_image():
    ours, _ = processors()
    out = ours(images=np.full((20, 30), 128, np.uint8), text="<image>x", return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == 16


def test_a_4d_array_is_a_batch_of_images_wherever_it_stands():
    ours, _ = processors()
    stacked = np.stack([np.asarray(image(0, 32, 32)), np.asarray(image(1, 32, 32))])  # (2, 32, 32, 3)
    out = ours(images=stacked, text="<image><image>", return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 32, 32) and (out["input_ids"] == IMAGE_TOKEN_ID).sum() == 32
    out = ours(images=[[stacked], [image(2)]], text=["<image><image>", "<image>"], padding=True, return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [32, 16]
    with pytest.raises(ValueError, match=r"Sample 0 has 1 '<image>' markers but its image list has 2 images"):
        ours(images=[[stacked], []], text=["<image>", "<image>"], padding=True)
