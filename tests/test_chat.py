"""ChatSession against transformers' own LLaVA on hand-written prompts, its fast paths, and `llava-ext chat` via a pipe."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.chat import ChatSession
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor
from llava_ext.processing_llava_ext import LlavaExtProcessor

from conftest import IMAGE_TOKEN_ID, build_tiny_tokenizer, tiny_llava_config

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = tiny_llava_config()
    reference = LlavaForConditionalGeneration(config).eval()
    ours = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict())).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.fixture(scope="module")
def processor():
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaExtProcessor(
        image_processor, build_tiny_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def red_image():
    return Image.new("RGB", (40, 40), (200, 30, 30))


def reference_answer(reference, processor, prompt: str, images: list) -> str:
    """Greedy answer of transformers' LLaVA to a whole hand-written prompt, with no cache carried over."""
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    sequences = reference.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def expected_conversation(reference, processor, questions: list[str], images: list) -> list[str]:
    """Answers turn by turn, each from a fresh generate over the llava-1.5 format written out by hand."""
    answers, history = [], ""
    for turn, question in enumerate(questions):
        image_part = "<image>\n" if turn == 0 and images else ""
        prompt = f"{history}USER: {image_part}{question} ASSISTANT:"
        answers.append(reference_answer(reference, processor, prompt, images))
        history = f"{prompt} {answers[-1]}</s>"
    return answers


def count_prefill_tokens(model):
    """Record the input length of every forward call; returns the list and the hook handle."""
    lengths = []

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        lengths.append(input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1])

    return lengths, model.register_forward_pre_hook(hook, with_kwargs=True)


QUESTIONS = ["What is it?", "Why is it red?", "And then?"]


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_session_equals_fresh_generate_over_whole_conversation(models, processor, cache_implementation):
    reference, ours = models
    expected = expected_conversation(reference, processor, QUESTIONS, [red_image()])
    session = ChatSession(ours, processor, cache_implementation=cache_implementation, compile=False)
    lengths, handle = count_prefill_tokens(ours)
    try:
        answers = [
            session.ask(QUESTIONS[0], images=[red_image()], max_new_tokens=MAX_NEW_TOKENS),
            session.ask(QUESTIONS[1], max_new_tokens=MAX_NEW_TOKENS),
            "".join(session.ask(QUESTIONS[2], stream=True, max_new_tokens=MAX_NEW_TOKENS)),
        ]
    finally:
        handle.remove()
    assert answers == expected
    # Later turns prefill only what is new: at most the last answer (re-tokenized) and "</s>USER: Q ASSISTANT:",
    # never the first turn with its 15 image tokens again.
    prefills = [length for length in lengths if length > 1]
    assert len(prefills) == 3 and prefills[0] > 15
    for question, length in zip(QUESTIONS[1:], prefills[1:]):
        assert length <= MAX_NEW_TOKENS + len(f"</s>USER: {question} ASSISTANT:")


def test_compiled_decode_equals_plain_decode(models, processor):
    """The default path (static cache + compiled decode) gives the plain dynamic-cache path's greedy tokens."""
    _, ours = models
    plain = ChatSession(ours, processor, cache_implementation="dynamic")
    fast = ChatSession(ours, processor)
    assert fast.compile and fast.cache_implementation == "static"
    for question, images in [(QUESTIONS[0], [red_image()]), (QUESTIONS[1], None)]:
        assert fast.ask(question, images=images, max_new_tokens=MAX_NEW_TOKENS) == plain.ask(
            question, images=images, max_new_tokens=MAX_NEW_TOKENS
        )
    assert torch.equal(fast._cached_ids, plain._cached_ids)
    # A second session's cache has the same shape, so the compiled step is reused; it must decode into the new
    # session's cache, not the first one's (frozen weights must not freeze the cache).
    again = ChatSession(ours, processor)
    question = QUESTIONS[2]
    assert again.ask(question, max_new_tokens=MAX_NEW_TOKENS) == ChatSession(
        ours, processor, cache_implementation="dynamic"
    ).ask(question, max_new_tokens=MAX_NEW_TOKENS)


def test_failed_compile_falls_back_to_the_uncompiled_answer(processor):
    """Without a working C++ compiler the compiled CPU decode can't be built: the session answers uncompiled."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(1)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()  # nothing cached
    length = {"max_new_tokens": 4, "min_new_tokens": 4}  # decode steps are what gets compiled
    expected = ChatSession(model, processor, cache_implementation="dynamic").ask(QUESTIONS[0], **length)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
        answer = ChatSession(model, processor, compile=True).ask(QUESTIONS[0], **length)
    assert answer == expected


def test_mismatching_cache_is_cut_back_and_answers_stay_equal(models, processor):
    reference, ours = models
    expected = expected_conversation(reference, processor, QUESTIONS[:2], [red_image()])
    session = ChatSession(ours, processor, cache_implementation="dynamic")
    session.ask(QUESTIONS[0], images=[red_image()], max_new_tokens=MAX_NEW_TOKENS)
    # Pretend the cache saw a different token inside the image placeholders: reuse must stop before that image,
    # so the image is encoded again rather than half-reused.
    image_start = int((session._cached_ids == IMAGE_TOKEN_ID).nonzero()[0, 0])
    session._cached_ids = session._cached_ids.clone()
    session._cached_ids[image_start + 5] = 7
    lengths, handle = count_prefill_tokens(ours)
    try:
        second = session.ask(QUESTIONS[1], max_new_tokens=MAX_NEW_TOKENS)
    finally:
        handle.remove()
    assert second == expected[1]
    total = session._cached_ids.shape[0]
    assert lengths[0] > total - image_start - MAX_NEW_TOKENS  # everything from the image on was prefilled again


def test_reset_starts_a_new_conversation(models, processor):
    reference, ours = models
    session = ChatSession(ours, processor, cache_implementation="dynamic")
    session.ask(QUESTIONS[0], images=[red_image()], max_new_tokens=MAX_NEW_TOKENS)
    session.reset()
    assert session.messages == [] and session.images == []
    expected = reference_answer(reference, processor, f"USER: {QUESTIONS[1]} ASSISTANT:", [])
    assert session.ask(QUESTIONS[1], max_new_tokens=MAX_NEW_TOKENS) == expected


def test_bad_cache_implementation_is_named(models, processor):
    with pytest.raises(ValueError, match="cache_implementation='paged' is not supported; use 'static'"):
        ChatSession(models[1], processor, cache_implementation="paged")
    with pytest.raises(ValueError, match="compile=True needs cache_implementation='static'"):
        ChatSession(models[1], processor, cache_implementation="dynamic", compile=True)


def test_compile_is_left_off_when_cpu_memory_is_short(models, processor, monkeypatch, caplog):
    """Compiling keeps a pre-packed copy of the weights (twice their size while compiling): with less free memory
    than that the default is the uncompiled decode and a warning, while an explicit compile=True is obeyed."""
    import psutil
    from transformers.utils import logging

    ours = models[1]
    weights = sum(parameter.nbytes for parameter in ours.parameters())
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=weights))
    logging.get_logger("llava_ext.chat").addHandler(caplog.handler)  # transformers' loggers don't propagate
    try:
        short = ChatSession(ours, processor)
    finally:
        logging.get_logger("llava_ext.chat").removeHandler(caplog.handler)
    assert not short.compile
    assert "Not compiling the decode step" in caplog.text and f"{weights / 2**20:,.0f} MiB more" in caplog.text
    assert ChatSession(ours, processor, compile=True).compile
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=2 * weights))
    assert ChatSession(ours, processor).compile


def test_unanswered_question_is_forgotten(models, processor):
    session = ChatSession(models[1], processor, cache_implementation="dynamic")
    with pytest.raises(ValueError, match="image"):
        session.ask("One image, two placeholders: <image>", images=[red_image()], max_new_tokens=2)
    assert session.messages == [] and session.images == []


def test_cli_chat_through_a_pipe(models, processor, tmp_path):
    reference, ours = models
    ours.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    red_image().save(tmp_path / "red.png")
    expected = expected_conversation(reference, processor, QUESTIONS[:2], [red_image()])
    after_reset = reference_answer(reference, processor, f"USER: {QUESTIONS[2]} ASSISTANT:", [])

    stdin = f"/image {tmp_path / 'red.png'}\n{QUESTIONS[0]}\n{QUESTIONS[1]}\n/reset\n{QUESTIONS[2]}\n/exit\nnever asked\n"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "llava_ext.cli", "chat", str(tmp_path / "model"), "--no-compile", "--device", "cpu",
         "--max-new-tokens", str(MAX_NEW_TOKENS)],
        input=stdin, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{answer}\n" for answer in [*expected, after_reset])


def test_cli_help_ends_with_an_example():
    from llava_ext.cli import build_parser

    parser = build_parser()
    chat_parser = parser._subparsers._group_actions[0].choices["chat"]
    assert chat_parser.format_help().strip().splitlines()[-1].startswith("example: llava-ext chat ")
