"""The bundled chat templates render their published formats (golden strings) and mask exactly the answers."""

import numpy as np
import PIL.Image
import pytest
from conftest import BOS_ID, build_tiny_tokenizer, needs_image_assistant_masks

from llava_ext import LlavaExtImageProcessor, LlavaExtProcessor
from llava_ext.processing_llava_ext import CHAT_TEMPLATE_NAMES

IMAGE = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
TOKENS_PER_IMAGE = 16  # (32 / 8)^2 patches, CLIP: + CLS - CLS ("default")

CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "A chat."}]},
    {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": "Where?"},  # plain-string content works too
]
ANSWERED = CONVERSATION + [{"role": "assistant", "content": "On a mat."}]

# Written from each format's published definition, with add_generation_prompt=True after CONVERSATION. The formats
# that start with a BOS token show it (ChatML has none): the tiny tokenizer's "<s>" is also Vicuna's and Mistral's BOS;
# Llama 3 is rendered with its own, "<|begin_of_text|>" (RENDER_KWARGS).
GOLDEN = {
    # LLaVA conv_vicuna_v1: <s>, system + " ", "USER: ... ASSISTANT: answer</s>", images as "<image>\n"
    "llava-1.5": "<s>A chat. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Where? ASSISTANT:",
    # Mistral instruct: "<s>[INST] Instruction [/INST] Model answer</s>[INST] ...", system folded into the first [INST]
    "mistral": "<s>[INST] A chat.\n\n<image>\nWhat is it? [/INST] A cat.</s>[INST] Where? [/INST]",
    "chatml": (
        "<|im_start|>system\nA chat.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # LLaVA-1.6 Vicuna (conv_vicuna_v1, llava-v1.6-vicuna's documented prompt): llava-1.5's layout; a system message
    # given replaces the format's default one (VICUNA_SYSTEM, rendered when there is none)
    "llava-1.6-vicuna": "<s>A chat. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Where? ASSISTANT:",
    # llava-hf's OneVision/Interleave template: "<|im_start|>role\n", images "<image>\n", videos "<video>\n", text,
    # "<|im_end|>\n"; "<|im_start|>assistant\n" to generate; no BOS, no default system message
    "llava-onevision": (
        "<|im_start|>system\nA chat.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"
    ),
}
VICUNA_SYSTEM = (  # LLaVA's conv_vicuna_v1.system, as llava-v1.6-vicuna-7b-hf's model card prompt starts
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the human's questions."
)
RENDER_KWARGS = {"llama-3": {"bos_token": "<|begin_of_text|>"}}  # the tiny tokenizer's BOS is "<s>"

# Exactly one BOS in the ids: the template's where it renders one, else the one the tiny tokenizer adds (ChatML).
RENDERS_BOS = {"llava-1.5", "llava-1.6-vicuna", "mistral", "llama-3"}

# ANSWERED rendered, cut into (text, is_assistant) pieces: the mask must be 1 on exactly the second kind.
IMG = "<image>" * TOKENS_PER_IMAGE
MASK_SEGMENTS = {
    "llava-1.5": [
        (f"<s>A chat. USER: {IMG}\nWhat is it? ASSISTANT: ", 0), ("A cat.</s>", 1),
        ("USER: Where? ASSISTANT: ", 0), ("On a mat.</s>", 1),
    ],
    "mistral": [
        (f"<s>[INST] A chat.\n\n{IMG}\nWhat is it? [/INST] ", 0), ("A cat.</s>", 1),
        ("[INST] Where? [/INST] ", 0), ("On a mat.</s>", 1),
    ],
    "chatml": [
        (f"<|im_start|>system\nA chat.<|im_end|>\n<|im_start|>user\n{IMG}\nWhat is it?<|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("A cat.<|im_end|>", 1),
        ("\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n", 0), ("On a mat.<|im_end|>", 1), ("\n", 0),
    ],
    "llama-3": [
        (f"<s><|start_header_id|>system<|end_header_id|>\n\nA chat.<|eot_id|><|start_header_id|>user<|end_header_id|>"
         f"\n\n{IMG}\nWhat is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("A cat.<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("On a mat.<|eot_id|>", 1),
    ],
    "llava-1.6-vicuna": [
        (f"<s>A chat. USER: {IMG}\nWhat is it? ASSISTANT: ", 0), ("A cat.</s>", 1),
        ("USER: Where? ASSISTANT: ", 0), ("On a mat.</s>", 1),
    ],
    "llava-onevision": [
        (f"<|im_start|>system\nA chat.<|im_end|>\n<|im_start|>user\n{IMG}\nWhat is it?<|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("A cat.<|im_end|>", 1),
        ("\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n", 0), ("On a mat.<|im_end|>", 1), ("\n", 0),
    ],
}


def make_processor(chat_template=None) -> LlavaExtProcessor:
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaExtProcessor(
        image_processor, build_tiny_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )


def test_every_bundled_template_is_tested():
    assert set(CHAT_TEMPLATE_NAMES) == set(GOLDEN) == set(MASK_SEGMENTS)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_template_renders_its_published_format(name):
    processor = make_processor(name)
    rendered = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, **RENDER_KWARGS.get(name, {}))
    assert rendered == GOLDEN[name]


def test_llava_15_is_the_default_and_names_work_per_call():
    processor = make_processor()
    assert processor.apply_chat_template(CONVERSATION[1:], add_generation_prompt=True) == (
        "<s>USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Where? ASSISTANT:"
    )
    rendered = processor.apply_chat_template(CONVERSATION, chat_template="chatml", add_generation_prompt=True)
    assert rendered == GOLDEN["chatml"]


def test_images_render_where_they_stand():
    message = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": " and"}, {"type": "image"},
    ]}]
    assert make_processor().apply_chat_template(message, add_generation_prompt=True) == (
        "<s>USER: Compare<image>\n and<image>\n ASSISTANT:"
    )


def test_vicuna_renders_its_system_prompt_when_none_is_given():
    rendered = make_processor("llava-1.6-vicuna").apply_chat_template(CONVERSATION[1:], add_generation_prompt=True)
    assert rendered == f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Where? ASSISTANT:"


VISUALS_LATE = [{"role": "user", "content": [
    {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": " with"}, {"type": "video"},
    {"type": "image"},
]}]


def test_onevision_puts_images_then_videos_first_as_llava_hf_does():
    rendered = make_processor("llava-onevision").apply_chat_template(VISUALS_LATE, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n<image>\n<image>\n<video>\nCompare with<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_keeps_images_and_videos_where_they_stand():
    rendered = make_processor("chatml").apply_chat_template(VISUALS_LATE, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nCompare<image>\n with<video>\n<image>\n<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_template_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"chat_template='vicuna'.*llava-1.5, mistral, chatml, llama-3"):
        make_processor("vicuna")


@pytest.mark.parametrize("name", list(MASK_SEGMENTS))
@needs_image_assistant_masks
def test_assistant_mask_covers_exactly_the_answers(name):
    processor = make_processor(name)
    out = processor.apply_chat_template(
        ANSWERED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    tokenizer = processor.tokenizer
    expected_ids, expected_mask = ([], []) if name in RENDERS_BOS else ([BOS_ID], [0])
    for text, is_answer in MASK_SEGMENTS[name]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_mask += [is_answer] * len(ids)
    assert out["input_ids"][0].tolist() == expected_ids
    assert expected_ids[0] == BOS_ID and expected_ids.count(BOS_ID) == 1
    assert out["assistant_masks"][0].tolist() == expected_mask
    assert out["pixel_values"].shape == (1, 3, 32, 32)
