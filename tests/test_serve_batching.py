"""`llava_ext.batching`: concurrent requests in one left-padded `generate()`, each answer equal to the request's own
greedy `generate()` (the expected values here come from plain `model.generate`, one request at a time)."""

import threading

import pytest
import torch
from conftest import HANG_GUARD_S, IMAGE_TOKEN_ID, NUM_PATCHES
from test_serve import MAX_TOKENS, data_url, processor_user, suppressed_ids, tiny_checkpoint

from llava_ext.batching import BatchingGenerator, BatchSettings, GenerationRequest

# Never closes a batch by time in these tests: a batch closes when full, so what shares one does not depend on timing
FULL_BATCHES_ONLY = HANG_GUARD_S


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("batching") / "checkpoint")


def image(seed: int) -> tuple:
    return ("image", data_url(seed))


# Different prompt lengths, 0 to 3 images, text-only mixed with image requests
CONVERSATIONS = [
    [processor_user(image(0), "What is in the image?")],
    [processor_user("Hi")],
    [processor_user(image(1), image(2), "Compare the two pictures, please, in some detail.")],
    [processor_user("A much longer question, with no image at all, about nothing in particular.")],
    [processor_user(image(3), "x")],
    [processor_user(image(4), image(5), image(6), "Three?")],
    [processor_user(image(7), "Colour?"), {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
     processor_user("And the shape?")],
]
MAX_NEW_TOKENS = [6, 3, 8, 5, 7, 4, 6]


def encode(processor, conversation: list[dict]) -> dict:
    return dict(processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ))


def plain_generate(model, inputs: dict, **kwargs) -> list[int]:
    """The request's own greedy answer: `model.generate` on it alone."""
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, **kwargs)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


class CountingGenerate:
    """Wraps `model.generate` to record the batch size of each call."""

    def __init__(self, model, monkeypatch):
        self.batch_sizes = []
        generate = model.generate

        def counting(**kwargs):
            self.batch_sizes.append(kwargs["input_ids"].shape[0])
            return generate(**kwargs)

        monkeypatch.setattr(model, "generate", counting)


def run_all(generator: BatchingGenerator, requests: list[tuple[dict, dict]], on_token=None) -> list:
    """Submit every (inputs, generation kwargs) at once; the results in order, once all have finished."""
    results, finished = [None] * len(requests), [threading.Event() for _ in requests]

    def on_finish(index):
        def record(result):
            results[index] = result
            finished[index].set()
        return record

    for index, (inputs, kwargs) in enumerate(requests):
        generator.submit(GenerationRequest(
            inputs, kwargs, on_finish(index), on_token=None if on_token is None else on_token(index)
        ))
    for event in finished:
        assert event.wait(HANG_GUARD_S), "a request never finished"
    return results


def test_mixed_requests_in_one_batch_equal_their_own_greedy_answers(tiny, monkeypatch):
    model, processor = tiny
    bias = {(token,): -100.0 for token in suppressed_ids(processor)}  # nothing stops early: all lengths are exact
    inputs = [encode(processor, conversation) for conversation in CONVERSATIONS]
    assert {len(i.get("pixel_values", [])) for i in inputs} == {0, 1, 2, 3}
    assert len({i["input_ids"].shape[1] for i in inputs}) == len(inputs)  # all lengths differ
    expected = [plain_generate(model, i, max_new_tokens=n, sequence_bias=bias) for i, n in zip(inputs, MAX_NEW_TOKENS)]

    counting = CountingGenerate(model, monkeypatch)
    generator = BatchingGenerator(model, processor.tokenizer.pad_token_id,
                                  BatchSettings(max_batch_size=len(inputs), max_wait_s=FULL_BATCHES_ONLY))
    streamed = [[] for _ in inputs]
    results = run_all(
        generator,
        [(i, {"max_new_tokens": n, "do_sample": False, "sequence_bias": bias}) for i, n in zip(inputs, MAX_NEW_TOKENS)],
        on_token=lambda index: streamed[index].append,
    )
    assert counting.batch_sizes == [len(inputs)]  # one generate() for all of them
    assert results == expected
    assert streamed == expected  # streamed token by token, each to its own request
    assert [len(r) for r in results] == MAX_NEW_TOKENS


def test_rows_stop_at_their_own_end_of_sequence(tiny, monkeypatch):
    """An end-of-sequence token one request generates early ends its row only; generate's pad after it is not sent."""
    model, processor = tiny
    inputs = [encode(processor, conversation) for conversation in CONVERSATIONS[:4]]
    free = [plain_generate(model, i, max_new_tokens=8, eos_token_id=None) for i in inputs]
    eos = free[0][2]  # a token request 0 generates third: with it as end of sequence, request 0 stops there
    expected = [plain_generate(model, i, max_new_tokens=8, eos_token_id=eos) for i in inputs]
    assert len(expected[0]) == 3 and expected[0][-1] == eos
    assert any(len(answer) == 8 for answer in expected)  # and another runs to its limit

    counting = CountingGenerate(model, monkeypatch)
    generator = BatchingGenerator(model, processor.tokenizer.pad_token_id,
                                  BatchSettings(max_batch_size=len(inputs), max_wait_s=FULL_BATCHES_ONLY))
    results = run_all(generator, [(i, {"max_new_tokens": 8, "do_sample": False, "eos_token_id": eos}) for i in inputs])
    assert counting.batch_sizes == [len(inputs)]
    assert results == expected


def test_requests_that_cannot_share_a_batch_run_apart_and_still_answer_right(tiny, monkeypatch):
    model, processor = tiny
    inputs = [encode(processor, conversation) for conversation in CONVERSATIONS[:4]]
    settings = [  # two greedy requests, one with other settings, one seeded sample
        {"max_new_tokens": 4, "do_sample": False},
        {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.5},
        {"max_new_tokens": 6, "do_sample": False},
        {"max_new_tokens": 4, "do_sample": True, "seed": 7},
    ]

    def expected_answer(i, kwargs):
        kwargs = dict(kwargs)
        torch.manual_seed(kwargs.pop("seed", 0))
        with torch.no_grad():
            return model.generate(**i, **kwargs)[0, i["input_ids"].shape[1]:].tolist()

    expected = [expected_answer(i, kwargs) for i, kwargs in zip(inputs, settings)]
    counting = CountingGenerate(model, monkeypatch)
    generator = BatchingGenerator(model, processor.tokenizer.pad_token_id,
                                  BatchSettings(max_batch_size=len(inputs), max_wait_s=FULL_BATCHES_ONLY))
    assert run_all(generator, list(zip(inputs, settings))) == expected
    assert sorted(counting.batch_sizes) == [1, 1, 2]  # the two plain greedy ones together


def test_a_request_that_breaks_its_batch_fails_alone(tiny):
    model, processor = tiny
    good = [encode(processor, conversation) for conversation in CONVERSATIONS[:3]]
    broken = encode(processor, CONVERSATIONS[2])
    broken["pixel_values"] = broken["pixel_values"][:1]  # two images' placeholders, one image
    assert (broken["input_ids"] == IMAGE_TOKEN_ID).sum() == 2 * NUM_PATCHES
    kwargs = {"max_new_tokens": MAX_TOKENS, "do_sample": False}
    expected = [plain_generate(model, i, max_new_tokens=MAX_TOKENS) for i in good]

    generator = BatchingGenerator(model, processor.tokenizer.pad_token_id,
                                  BatchSettings(max_batch_size=4, max_wait_s=FULL_BATCHES_ONLY))
    results = run_all(generator, [(good[0], kwargs), (broken, kwargs), (good[1], kwargs), (good[2], kwargs)])
    assert isinstance(results[1], ValueError) and "image" in str(results[1]).lower()
    assert [results[0], results[2], results[3]] == expected


def test_a_cancelled_request_ends_its_row_and_the_others_go_on(tiny):
    model, processor = tiny
    bias = {(token,): -100.0 for token in suppressed_ids(processor)}
    inputs = [encode(processor, conversation) for conversation in CONVERSATIONS[:3]]
    expected = [plain_generate(model, i, max_new_tokens=8, sequence_bias=bias) for i in inputs]
    streamed = [[] for _ in inputs]

    def on_token(index):
        def receive(token):
            streamed[index].append(token)
            if index == 1 and len(streamed[1]) == 2:
                raise RuntimeError("the client has gone")  # as serve's streamer does once cancelled
        return receive

    generator = BatchingGenerator(model, processor.tokenizer.pad_token_id,
                                  BatchSettings(max_batch_size=3, max_wait_s=FULL_BATCHES_ONLY))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "sequence_bias": bias}
    results = run_all(generator, [(i, kwargs) for i in inputs], on_token=on_token)
    assert results[1] is None and streamed[1] == expected[1][:2]  # nothing after it left
    assert [results[0], results[2]] == [expected[0], expected[2]]


def test_a_prompt_over_the_context_is_refused_before_it_queues(tiny):
    model, processor = tiny
    limit = model.config.get_text_config().max_position_embeddings
    long = encode(processor, [processor_user("y" * limit)])
    generator = BatchingGenerator(model, processor.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=rf"The prompt has {long['input_ids'].shape[1]} tokens, but the model takes "
                                         rf"at most {limit}, prompt and answer"):
        generator.submit(GenerationRequest(long, {"max_new_tokens": 2}, on_finish=lambda result: None))
    assert generator.waiting == 0


def test_batch_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch_size is 0; it must be at least 1"):
        BatchSettings(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_s is -1; it must be 0 or more"):
        BatchSettings(max_wait_s=-1)
