"""ChatSession against transformers' own LLaVA on hand-written prompts, its fast paths, and `llava-ext chat` via a pipe;
the context limit, interrupted answers, sessions sharing a model, and generate()'s batch invariance."""

import copy
import io
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.chat import ChatSession, ContextFullError
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor
from llava_ext.processing_llava_ext import LlavaExtProcessor

from conftest import HANG_GUARD_S, IMAGE_TOKEN_ID, build_tiny_tokenizer, tiny_llava_config

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


def test_compiled_decode_runs_every_linear_on_inductors_cpp_gemm(processor):
    """On CPU every linear of the compiled decode step is inductor's C++ GEMM template, whatever inductor timed or
    cached on disk before (a timing taken on a busy CPU once kept ATen's slower GEMV for every later chat), and the
    step compiled rather than fell back to the uncompiled forward."""
    from torch._dynamo.utils import counters

    torch.manual_seed(2)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()
    length = {"max_new_tokens": 4, "min_new_tokens": 4}  # decode steps are what gets compiled
    expected = ChatSession(model, processor, cache_implementation="dynamic").ask(QUESTIONS[0], **length)
    torch._dynamo.reset()
    counters.clear()
    assert ChatSession(model, processor, compile=True).ask(QUESTIONS[0], **length) == expected
    linears = sum(isinstance(module, torch.nn.Linear) for module in model.model.language_model.modules()) + 1
    assert counters["inductor"]["cpp_templated_kernel_counter"] == linears  # + 1: lm_head
    assert counters["inductor"]["select_algorithm_autotune"] == 0  # one choice per GEMM: nothing timed, nothing cached


def test_bf16_vision_tower_runs_compiled_inside_the_context_only(processor):
    """A bf16 CPU model's vision tower runs compiled in ChatSession's compiled path (its frozen weights, its answers),
    and is the eager module outside it; a deep copy with other weights gets its own compiled tower."""
    from llava_ext.chat import compiled_vision_tower, compiles_vision_tower, decode_compile_settings

    torch.manual_seed(3)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()
    assert not compiles_vision_tower(model)  # fp32: eager (the compiled tower gains too little there)
    model = model.to(torch.bfloat16)
    assert compiles_vision_tower(model)
    tower = model.model.vision_tower
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    calls = []
    tower.encoder.layers[0].register_forward_pre_hook(lambda module, args: calls.append(torch.compiler.is_compiling()))

    def features(copy_of=None):
        with torch.no_grad():
            return (copy_of or model).get_image_features(pixel_values).pooler_output[0].float()

    eager = features()
    with decode_compile_settings(torch.device("cpu")), compiled_vision_tower(model):
        compiled = features()
    assert calls == [False, True]  # the second call was traced: the compiled tower ran
    assert "select_hidden_states" not in tower.__dict__  # the class's eager method again
    scale = eager.abs().max()
    torch.testing.assert_close(compiled, eager, atol=0.02 * scale, rtol=0)  # bf16: other kernels, same features

    twin = copy.deepcopy(model)
    with torch.no_grad():
        patch_embedding = twin.model.vision_tower.embeddings.patch_embedding.weight
        patch_embedding.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    twin_eager = features(twin)
    assert (twin_eager - eager).abs().max() > scale  # the copy's tower computes something else
    with decode_compile_settings(torch.device("cpu")), compiled_vision_tower(twin):
        twin_compiled = features(twin)
    # its own weights, not the original's
    torch.testing.assert_close(twin_compiled, twin_eager, atol=0.02 * twin_eager.abs().max(), rtol=0)


@pytest.mark.slow  # about 30 s: dynamo traces the whole decode step before the C++ compile fails
@pytest.mark.release
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
        input=stdin, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{answer}\n" for answer in [*expected, after_reset])


def test_cli_help_ends_with_an_example():
    from llava_ext.cli import build_parser

    parser = build_parser()
    chat_parser = parser._subparsers._group_actions[0].choices["chat"]
    assert chat_parser.format_help().strip().splitlines()[-1].startswith("example: llava-ext chat ")


# ---------------------------------------------------------------------------------------------------------------
# Context limit, interrupted answers, sessions sharing a model, batch invariance


IMAGE_PART = "<image>\n"


def hand_prompt(history: list[tuple[str, bool, str]], question: str, image: bool = False) -> str:
    """The llava-1.5 format written out by hand: `history` holds (question, has an image, answer) turns."""
    turns = [f"USER: {IMAGE_PART if has_image else ''}{q} ASSISTANT: {a}</s>" for q, has_image, a in history]
    return "".join(turns) + f"USER: {IMAGE_PART if image else ''}{question} ASSISTANT:"


def test_full_context_raises_a_named_error_and_drop_oldest_turns_makes_room(models, processor):
    """Past the model's max_position_embeddings (256) the question is refused before any compute, with the limit,
    the length and the fixes named; the conversation is untouched, and dropping turns lets the question through."""
    reference, ours = models
    session = ChatSession(ours, processor, cache_implementation="dynamic")
    history = []
    with pytest.raises(ContextFullError) as raised:
        for turn in range(20):
            question, image = QUESTIONS[turn % 3], turn == 0
            answer = session.ask(question, images=[red_image()] if image else None, max_new_tokens=MAX_NEW_TOKENS)
            history.append((question, image, answer))
    error = raised.value
    assert len(history) >= 3 and error.limit == 256 and error.needed > 256 and not error.question_alone
    assert isinstance(error, ValueError)
    assert re.fullmatch(
        rf"The conversation \({len(history)} turns and this question\) is \d+ tokens; with max_new_tokens="
        rf"{MAX_NEW_TOKENS} it needs {error.needed}, more than the context limit of 256 tokens \(the text model's "
        r"max_position_embeddings\)\. Call reset\(\) to start a new conversation or drop_oldest_turns\(\) to forget "
        r"the oldest turns(, lower max_new_tokens \(at most \d+ fit\))?, or create the session with "
        r"on_context_full='drop_oldest' to forget them by itself\.",
        str(error),
    ), str(error)
    assert len(session.messages) == 2 * len(history)  # the refused question is not recorded
    lengths, handle = count_prefill_tokens(ours)
    try:
        with pytest.raises(ContextFullError):  # and refused before the model runs
            session.ask(QUESTIONS[0], max_new_tokens=MAX_NEW_TOKENS)
    finally:
        handle.remove()
    assert lengths == []

    assert session.drop_oldest_turns(2) == 2
    assert session.images == []  # the first turn's image went with it
    expected = reference_answer(reference, processor, hand_prompt(history[2:], QUESTIONS[0]), [])
    assert session.ask(QUESTIONS[0], max_new_tokens=MAX_NEW_TOKENS) == expected
    assert session.drop_oldest_turns(100) == len(history) - 1  # all the answered turns there are
    assert len(session.messages) == 0


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_drop_oldest_forgets_the_fewest_turns_and_answers_as_a_fresh_session(models, processor, cache_implementation):
    reference, ours = models
    limit = 160
    session = ChatSession(
        ours, processor, system="Be brief.", cache_implementation=cache_implementation, compile=False,
        max_context=limit, on_context_full="drop_oldest",
    )
    def images_of(turns, image):
        return [red_image()] * (sum(has_image for _, has_image, _ in turns) + image)

    def prompt_and_length(turns, question, image):
        prompt = "Be brief. " + hand_prompt(turns, question, image)
        return prompt, len(processor(text=prompt, images=images_of(turns, image) or None)["input_ids"][0])

    history, drops = [], 0
    for turn in range(9):
        question, image = f"{QUESTIONS[turn % 3]} ({turn})", turn == 0
        answer = session.ask(question, images=[red_image()] if image else None, max_new_tokens=MAX_NEW_TOKENS)
        dropped = session.dropped_turns
        if dropped:
            drops += 1
            _, length = prompt_and_length(history[dropped - 1 :], question, image)
            assert length + MAX_NEW_TOKENS > limit  # the fewest: with one turn more it would not have fitted
        history = history[dropped:]
        prompt, length = prompt_and_length(history, question, image)
        assert length + MAX_NEW_TOKENS <= limit
        assert answer == reference_answer(reference, processor, prompt, images_of(history, image)), turn
        history.append((question, image, answer))
        assert session.messages[0]["role"] == "system" and len(session.messages) == 1 + 2 * len(history)
    assert drops >= 3 and session.images == []  # the image's turn was dropped with its image


def test_a_question_too_long_alone_is_refused_without_dropping_anything(models, processor):
    _, ours = models
    session = ChatSession(
        ours, processor, cache_implementation="dynamic", max_context=64, on_context_full="drop_oldest"
    )
    session.ask("Hi", max_new_tokens=MAX_NEW_TOKENS)
    with pytest.raises(ContextFullError, match=r"This question alone is \d+ tokens .* more than the context limit of "
                       r"64 tokens \(max_context\)\. Shorten the question, send fewer images or lower max_new_tokens"):
        session.ask("x" * 60, max_new_tokens=MAX_NEW_TOKENS)
    assert len(session.messages) == 2 and session.dropped_turns == 0


def test_bad_context_settings_are_named(models, processor):
    with pytest.raises(ValueError, match=r"max_context=257 must be between 1 and the text model's "
                       r"max_position_embeddings \(256\)"):
        ChatSession(models[1], processor, max_context=257)
    with pytest.raises(ValueError, match="on_context_full='truncate' is not supported; use 'error'"):
        ChatSession(models[1], processor, on_context_full="truncate")
    with pytest.raises(ValueError, match="num_turns=0 must be at least 1"):
        ChatSession(models[1], processor).drop_oldest_turns(0)


def ctrl_c_during_generate(model, monkeypatch, call: int = 1, forward_call: int = 3) -> list:
    """Make the `call`-th `model.generate()` send SIGINT to the main thread, as Ctrl-C would, at its `forward_call`-th
    forward (1 = prefill), then hold the generation until the session's stop criterion is set (a hang guard at most).

    Returns the threads that ran that generate's forwards, one entry per forward.
    """
    generate = model.generate
    calls, forwards = [], []

    def interrupting_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) != call:
            return generate(*args, **kwargs)
        stop = next(c.event for c in kwargs["stopping_criteria"] if hasattr(c, "event"))  # ChatSession's own

        def hook(module, hook_args, hook_kwargs):
            forwards.append(threading.get_ident())
            if len(forwards) == forward_call:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                stop.wait(timeout=HANG_GUARD_S)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return generate(*args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(model, "generate", interrupting_generate)
    return forwards


needs_pthread_kill = pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals only")


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler (KeyboardInterrupt in the main thread), whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@needs_pthread_kill
def test_ctrl_c_during_a_streamed_answer_stops_it_and_forgets_the_turn(models, processor, default_sigint,
                                                                       monkeypatch):
    """SIGINT arrives while the generation thread runs: the consumer gets KeyboardInterrupt, the thread stops at the
    next token, the question is forgotten, and the next answer is a fresh session's over the conversation without
    it, reusing the cache (which stayed consistent) instead of prefilling everything again."""
    reference, ours = models
    expected = expected_conversation(reference, processor, [QUESTIONS[0], QUESTIONS[2]], [red_image()])
    session = ChatSession(ours, processor, compile=False)
    session.ask(QUESTIONS[0], images=[red_image()], max_new_tokens=MAX_NEW_TOKENS)
    length = {"max_new_tokens": 20, "min_new_tokens": 20}  # no early end of the answer by itself
    forwards = ctrl_c_during_generate(ours, monkeypatch)
    answer = session.ask(QUESTIONS[1], stream=True, **length)
    with pytest.raises(KeyboardInterrupt):
        for _ in answer:
            pass
    answer.close()  # as `llava-ext chat` does; a no-op when the interrupt landed inside the iterator
    monkeypatch.undo()
    assert len(forwards) <= 4 and threading.main_thread().ident not in forwards  # stopped at the next token
    assert session._worker is None and len(session.messages) == 2
    lengths, handle = count_prefill_tokens(ours)
    try:
        assert session.ask(QUESTIONS[2], max_new_tokens=MAX_NEW_TOKENS) == expected[1]
    finally:
        handle.remove()
    assert lengths[0] <= MAX_NEW_TOKENS + len(f"</s>USER: {QUESTIONS[2]} ASSISTANT:")  # the cache was reused


@pytest.mark.parametrize("how", ["close", "drop", "next_question"])
def test_interrupt_in_the_consumer_loop_forgets_the_turn(models, processor, how):
    """KeyboardInterrupt raised in the loop over a streamed answer; the iterator is then closed (what the CLI does),
    dropped (CPython closes it at once), or left alone until the next question settles it."""
    reference, ours = models
    expected = expected_conversation(reference, processor, [QUESTIONS[0], QUESTIONS[2]], [red_image()])
    session = ChatSession(ours, processor, compile=False)
    session.ask(QUESTIONS[0], images=[red_image()], max_new_tokens=MAX_NEW_TOKENS)
    answer = session.ask(QUESTIONS[1], stream=True, max_new_tokens=20, min_new_tokens=20)
    with pytest.raises(KeyboardInterrupt):
        for _ in answer:
            raise KeyboardInterrupt
    if how == "close":
        answer.close()
    elif how == "drop":
        del answer
    if how != "next_question":
        assert session._worker is None and len(session.messages) == 2
    assert session.ask(QUESTIONS[2], max_new_tokens=MAX_NEW_TOKENS) == expected[1]
    assert len(session.messages) == 4


def test_a_stream_never_iterated_is_forgotten_by_the_next_question(models, processor):
    reference, ours = models
    expected = expected_conversation(reference, processor, [QUESTIONS[2]], [])
    session = ChatSession(ours, processor, compile=False)
    unused = session.ask(QUESTIONS[0], images=[red_image()], stream=True, max_new_tokens=MAX_NEW_TOKENS)
    assert session.ask(QUESTIONS[2], max_new_tokens=MAX_NEW_TOKENS) == expected[0]
    assert session.images == [] and len(session.messages) == 2
    assert list(unused) == []  # closed: it yields nothing and records nothing
    assert len(session.messages) == 2


def test_ctrl_c_during_an_answer_without_streaming_forgets_the_turn(models, processor):
    reference, ours = models
    expected = expected_conversation(reference, processor, [QUESTIONS[0], QUESTIONS[2]], [red_image()])
    session = ChatSession(ours, processor, compile=False)
    session.ask(QUESTIONS[0], images=[red_image()], max_new_tokens=MAX_NEW_TOKENS)
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # generate() runs in this (the main) thread

    handle = ours.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            session.ask(QUESTIONS[1], max_new_tokens=20, min_new_tokens=20)
    finally:
        handle.remove()
    assert len(session.messages) == 2
    assert session.ask(QUESTIONS[2], max_new_tokens=MAX_NEW_TOKENS) == expected[1]


def blue_image():
    return Image.new("RGB", (40, 40), (30, 30, 200))


def interleaved_sessions_equal_alone(reference, ours, processor, **session_kwargs):
    questions = {"red": QUESTIONS, "blue": ["Is it blue?", "Why?", "Sure?"]}
    images = {"red": red_image, "blue": blue_image}
    expected = {name: expected_conversation(reference, processor, questions[name], [images[name]()]) for name in images}
    sessions = {name: ChatSession(ours, processor, **session_kwargs) for name in questions}
    answers = {name: [] for name in questions}
    for turn in range(3):
        for name, session in sessions.items():
            first = [images[name]()] if turn == 0 else None
            answers[name].append(session.ask(questions[name][turn], images=first, max_new_tokens=MAX_NEW_TOKENS))
    assert answers == expected


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_two_sessions_on_one_model_interleaved_answer_as_alone(models, processor, cache_implementation):
    interleaved_sessions_equal_alone(*models, processor, cache_implementation=cache_implementation, compile=False)


@pytest.mark.slow  # about 60 s on 2 CPU cores, most of it compiling the decode step
def test_two_compiled_sessions_interleaved_answer_as_alone(models, processor):
    """Both caches have one shape, so they share one compiled decode step, which must read each session's own cache."""
    interleaved_sessions_equal_alone(*models, processor, compile=True)


def test_greedy_answers_alone_equal_answers_in_a_left_padded_batch(models, processor):
    """Batch invariance of `generate()` on the processor's batched path: 8 prompts of mixed lengths, some with an
    image, left-padded (fp32): each row's greedy tokens equal the prompt's alone, and its logits agree closely."""
    _, ours = models
    assert processor.tokenizer.padding_side == "left"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (10, 10, 10), (250, 250, 250)]
    questions = ["What?", "Why is the sky blue today, and is it always?", "Hi", "Describe this in three words.",
                 "And then what happened next in the picture?", "Ok.", "Is there a cat?",
                 "Count the objects in the picture and name each of them."]
    prompts, images, per_prompt = [], [], []
    for index, question in enumerate(questions):
        image = [Image.new("RGB", (40 + 8 * index, 40), colours[len(images)])] if index % 3 != 2 else []
        prompts.append(f"USER: {IMAGE_PART if image else ''}{question} ASSISTANT:")
        images += image
        per_prompt.append(image)
    length = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}  # every row runs all 12 steps

    def generate(texts, pictures):
        inputs = processor(text=texts, images=pictures or None, padding=True, return_tensors="pt")
        out = ours.generate(**inputs, **length, output_scores=True, return_dict_in_generate=True)
        scores = torch.stack(out.scores, dim=1)  # (batch, new, vocab)
        return out.sequences[:, inputs["input_ids"].shape[1] :], scores.masked_fill(scores.isinf(), 0), inputs

    batch_tokens, batch_scores, inputs = generate(prompts, images)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 8 and (inputs["attention_mask"][:, 0] == 0).sum() == 7  # mixed, left-padded
    for row, (prompt, image) in enumerate(zip(prompts, per_prompt)):
        tokens, scores, _ = generate([prompt], image)
        assert torch.equal(tokens[0], batch_tokens[row]), row
        torch.testing.assert_close(scores[0], batch_scores[row], rtol=0, atol=1e-5)


def run_cli(models, processor, monkeypatch, capsys, stdin, *flags) -> tuple[int, str, str]:
    """`llava-ext chat` in this process on the tiny model (so a test can send it Ctrl-C): exit code, stdout, stderr."""
    import llava_ext.cli.chat
    from llava_ext.cli import build_parser

    monkeypatch.setattr(llava_ext.cli.chat, "load_model_and_processor", lambda *args, **kwargs: (models[1], processor))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    args = build_parser().parse_args(["chat", "tiny", "--no-compile", "--max-new-tokens", str(MAX_NEW_TOKENS), *flags])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_pthread_kill
def test_cli_ctrl_c_during_an_answer_notes_it_and_continues(models, processor, monkeypatch, capsys, default_sigint):
    reference, ours = models
    expected = expected_conversation(reference, processor, [QUESTIONS[0], QUESTIONS[2]], [])
    uninterrupted = expected_conversation(reference, processor, QUESTIONS[:2], [])[1]
    ctrl_c_during_generate(ours, monkeypatch, call=2)
    code, out, err = run_cli(models, processor, monkeypatch, capsys, "\n".join(QUESTIONS) + "\n")
    assert code == 0
    assert out.startswith(f"{expected[0]}\n") and out.endswith(f"\n{expected[1]}\n")
    partial = out[len(expected[0]) + 1 : -len(expected[1]) - 2]  # what was printed of the interrupted answer
    assert uninterrupted.startswith(partial) and len(partial) < len(uninterrupted)
    assert "[answer interrupted; the question was left out of the conversation]" in err


def test_cli_ctrl_c_at_the_prompt_quits_quietly(models, processor, monkeypatch, capsys):
    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    assert run_cli(models, processor, monkeypatch, capsys, CtrlC())[0] == 130


def test_cli_full_context_drops_old_turns_with_a_note_or_refuses_and_continues(models, processor, monkeypatch,
                                                                               capsys):
    reference, ours = models
    questions = [f"{QUESTIONS[turn % 3]} ({turn})" for turn in range(6)]
    session = ChatSession(ours, processor, compile=False, max_context=120, on_context_full="drop_oldest")
    expected = [session.ask(question, max_new_tokens=MAX_NEW_TOKENS) for question in questions]
    code, out, err = run_cli(models, processor, monkeypatch, capsys, "\n".join(questions) + "\n",
                             "--max-context", "120")
    assert code == 0 and out == "".join(f"{answer}\n" for answer in expected)
    assert "[context full: forgot the oldest 1 turn(s)]" in err

    stdin = "\n".join(questions) + "\n/reset\n" + QUESTIONS[2] + "\n"
    code, out, err = run_cli(models, processor, monkeypatch, capsys, stdin, "--max-context", "120",
                             "--on-context-full", "error")
    refused = err.count("error: The conversation (")
    answered = len(questions) - refused
    assert code == 0 and refused >= 2 and answered >= 2
    assert err.count("[type /reset to start a new conversation, or chat with --on-context-full drop_oldest]") == refused
    after_reset = reference_answer(reference, processor, f"USER: {QUESTIONS[2]} ASSISTANT:", [])
    assert out == "".join(f"{answer}\n" for answer in [*expected[:answered], after_reset])
