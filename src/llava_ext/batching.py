"""Batched generation for a server: requests that arrive together run as one left-padded `generate()`.

transformers' continuous batching serves LLMs only (`transformers serve --continuous-batching` falls back to one
request at a time for image-text models, 5.17-5.25), so a llava server answering 16 clients runs 16 generations back
to back. `BatchingGenerator` collects the requests that arrive within `max_wait_s` of each other (and those that queued
while the previous batch ran), up to `max_batch_size`, and runs them as one batch:

    request A  [<s> USER: <image>x16 \\n What? ASSISTANT:]           pixel_values (1, 3, H, W)
    request B  [<s> USER: <image>x16 <image>x16 \\n Both? ASSISTANT:] pixel_values (2, 3, H, W)
    request C  [<s> USER: Hi ASSISTANT:]                            no image
        -> input_ids (3, longest), left-padded, attention_mask 0 on the padding; pixel_values (3, 3, H, W): the images
           in request order, which is the order of their placeholders in the batch's rows
        -> one generate(); a stopping criterion reads each step's new token per row, hands it to its request (a
           streamed token, or kept for the answer), and ends the row at its own `max_new_tokens`, at its end-of-sequence
           token, or when its client has gone; generate stops when every row has.

Greedy answers equal one-at-a-time `generate()`: the models build position ids from the attention mask, so padding
moves nothing (tests/test_serve_batching.py checks mixed lengths, image counts and text-only requests). Only requests
whose answers cannot depend on their neighbours share a batch: the same generation settings except `max_new_tokens`,
no `seed` (a seeded sample runs alone, after setting it), no beam search or stop strings, inputs of `input_ids`,
`attention_mask` and `pixel_values` whose images have one shape; any other request runs alone, as before. A batch
that fails is run again one request at a time, so a request that breaks generation fails alone.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)

BATCHABLE_INPUTS = {"input_ids", "attention_mask", "pixel_values"}
# generate() settings that make a request run alone: its answer would depend on its neighbours or on the batch's shape
RUNS_ALONE = ("seed", "stop_strings", "num_beams", "num_return_sequences", "assistant_model", "prefill_chunk_size")


@dataclasses.dataclass
class BatchSettings:
    """How a server batches concurrent requests.

    Args:
        max_batch_size (`int`): the most requests in one `generate()`; 1 turns batching off.
        max_wait_s (`float`): how long the first request of a batch waits for others (they also gather while the
            previous batch runs).
    """

    max_batch_size: int = 16
    max_wait_s: float = 0.005

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size is {self.max_batch_size}; it must be at least 1 (1: no batching).")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s is {self.max_wait_s}; it must be 0 or more seconds.")


@dataclasses.dataclass(eq=False)
class GenerationRequest:
    """One request for `BatchingGenerator.submit`.

    Args:
        inputs (`dict[str, torch.Tensor]`): the processor's output for one prompt: `input_ids` (1, prompt_length),
            `attention_mask`, `pixel_values` (num_images, channels, height, width) when it has images.
        generation_kwargs (`dict`): `generate()` keyword arguments (`generation_config` included), `max_new_tokens`
            among them or in the config; `seed` is set before a request that runs alone.
        on_finish (`Callable`): called once, from the generation thread, with the generated token ids (the
            end-of-sequence token included, as `generate` returns it), `None` if the request was cancelled, or the
            exception that failed it.
        on_token (`Callable`, *optional*): called with each new token id as it is generated (streaming); an
            exception it raises cancels the request.
    """

    inputs: dict[str, torch.Tensor]
    generation_kwargs: dict[str, Any]
    on_finish: Callable[[list[int] | Exception | None], None]
    on_token: Callable[[int], None] | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False

    @property
    def prompt_length(self) -> int:
        return self.inputs["input_ids"].shape[-1]

    def setting(self, name: str, default=None):
        """A generation setting: the keyword argument, else the `generation_config`'s."""
        if self.generation_kwargs.get(name) is not None:
            return self.generation_kwargs[name]
        value = getattr(self.generation_kwargs.get("generation_config"), name, None)
        return default if value is None else value


def _batch_key(request: GenerationRequest) -> str | None:
    """What requests must share to run in one batch, as text; None for a request that runs alone."""
    if set(request.inputs) - BATCHABLE_INPUTS or request.inputs["input_ids"].shape[0] != 1:
        return None
    if any(request.setting(name) not in (None, 1, [], {}) for name in RUNS_ALONE):
        return None
    settings = {name: value for name, value in request.generation_kwargs.items() if name != "generation_config"}
    config = request.generation_kwargs.get("generation_config")
    if config is not None:
        settings = {**config.to_dict(), **settings}
    settings.pop("max_new_tokens", None)
    return repr(sorted((name, repr(value)) for name, value in settings.items()))


def _image_shape(request: GenerationRequest) -> tuple | None:
    pixel_values = request.inputs.get("pixel_values")
    return None if pixel_values is None else (tuple(pixel_values.shape[1:]), pixel_values.dtype)


class _RowsDone(StoppingCriteria):
    """Reads each step's new token per row: hands it to its request, and ends the row when the request is done."""

    def __init__(self, rows: list[GenerationRequest], eos_token_ids: set[int]):
        self.rows, self.eos_token_ids = rows, eos_token_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new_tokens = input_ids[:, -1].tolist()  # (batch,): this step's token of each row
        for row, token in zip(self.rows, new_tokens):
            if row.done:
                continue
            if row.cancelled.is_set():
                row.done = True
                continue
            row.tokens.append(token)
            if row.on_token is not None:
                try:
                    row.on_token(token)
                except Exception:  # its client has gone (a cancelled streamer raises): stop its row
                    row.cancelled.set()
            max_new_tokens = row.setting("max_new_tokens")
            row.done = token in self.eos_token_ids or (max_new_tokens is not None and len(row.tokens) >= max_new_tokens)
        return torch.tensor([row.done or row.cancelled.is_set() for row in self.rows], device=input_ids.device)


class BatchingGenerator:
    """Runs the generation requests of concurrent clients in batches, on a thread of its own.

    Args:
        model (`PreTrainedModel`): the model whose `generate` runs the batches.
        pad_token_id (`int`): the id left padding uses.
        settings (`BatchSettings`, *optional*): batch size and waiting time.
        tokenizer (*optional*): passed to `generate` (stop strings need it).
    """

    def __init__(self, model, pad_token_id: int, settings: BatchSettings | None = None, tokenizer=None):
        self.model, self.pad_token_id, self.tokenizer = model, pad_token_id, tokenizer
        self.settings = settings or BatchSettings()
        self.context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._waiting: list[GenerationRequest] = []  # taken from the queue, not yet run
        self.running = 0
        threading.Thread(target=self._run_forever, name="llava-ext-batching", daemon=True).start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue `request`; its `on_finish` is called once it ends. Returns it, for `cancel`.

        Raises:
            ValueError: the prompt leaves no room for an answer in the model's context.
        """
        length = request.prompt_length
        if self.context_length is not None and length >= self.context_length:
            raise ValueError(
                f"The prompt has {length} tokens, but the model takes at most {self.context_length}, prompt and "
                "answer; shorten the conversation or send fewer images."
            )
        self._queue.put(request)
        return request

    @staticmethod
    def cancel(request: GenerationRequest) -> None:
        """Stop `request`: dropped if it has not started, its row ended at the next step if it has."""
        request.cancelled.set()

    def _run_forever(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._run(batch)
            except Exception as error:  # never fails the thread: every request gets an answer
                logger.exception("A batch of %d requests failed outside generate", len(batch))
                for request in batch:
                    request.on_finish(error)
            finally:
                self.running = 0

    def _next_batch(self) -> list[GenerationRequest]:
        """Wait for a request, gather those that arrive within `max_wait_s`, and take the longest-waiting one with the
        requests that may share its batch."""
        # Only a fresh batch waits: requests left over from the last gathering have waited already
        wait_s = 0.0
        if not self._waiting:
            self._waiting.append(self._queue.get())
            wait_s = self.settings.max_wait_s
        deadline = time.monotonic() + wait_s
        while len(self._waiting) < self.settings.max_batch_size:
            try:
                remaining = deadline - time.monotonic()
                request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            self._waiting.append(request)
        first = self._waiting[0]
        batch, key, image_shape = [first], _batch_key(first), _image_shape(first)
        for request in self._waiting[1:]:
            if key is None or len(batch) == self.settings.max_batch_size or _batch_key(request) != key:
                continue
            shape = _image_shape(request)
            if image_shape is not None and shape is not None and shape != image_shape:
                continue
            image_shape = image_shape or shape
            batch.append(request)
        self._waiting = [request for request in self._waiting if request not in batch]
        return batch

    def _run(self, batch: list[GenerationRequest]) -> None:
        for request in batch:
            if request.cancelled.is_set():
                request.on_finish(None)
        batch = [request for request in batch if not request.cancelled.is_set()]
        if not batch:
            return
        self.running = len(batch)
        try:
            self._generate(batch)
        except Exception as error:
            if len(batch) > 1:  # find the request that broke it: each runs alone, and only that one fails
                logger.warning("A batch of %d requests failed (%s); running them one at a time", len(batch), error)
                for request in batch:
                    request.tokens, request.done = [], False
                    self._run([request])
                return
            if not isinstance(error, ValueError):
                logger.exception("A request failed")
            batch[0].on_finish(error)
            return
        for request in batch:
            request.on_finish(None if request.cancelled.is_set() else request.tokens)

    def _generate(self, batch: list[GenerationRequest]) -> None:
        """One left-padded `generate()` over `batch`; each request's tokens reach it through `_RowsDone`."""
        first = batch[0]
        kwargs = {name: value for name, value in first.generation_kwargs.items() if value is not None}
        seed = kwargs.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        if first.setting("num_beams", 1) > 1 or first.setting("num_return_sequences", 1) > 1:
            self._generate_whole(first, kwargs)
            return
        max_new_tokens = [request.setting("max_new_tokens") for request in batch]
        if None not in max_new_tokens:
            kwargs["max_new_tokens"] = max(max_new_tokens)
        eos = first.setting("eos_token_id", self.model.generation_config.eos_token_id)
        eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])
        model_inputs = self._padded_inputs(batch)
        stopping = StoppingCriteriaList([*kwargs.pop("stopping_criteria", []), _RowsDone(batch, eos_token_ids)])
        if self.tokenizer is not None:
            kwargs.setdefault("tokenizer", self.tokenizer)
        self.model.generate(**model_inputs, **kwargs, stopping_criteria=stopping)

    def _generate_whole(self, request: GenerationRequest, kwargs: dict) -> None:
        """Beam search and several sequences: generate's own loop, the first sequence's tokens at the end."""
        model_inputs = {name: value.to(self.model.device) for name, value in request.inputs.items()}
        sequences = self.model.generate(**model_inputs, **kwargs)
        request.tokens = sequences[0, request.prompt_length:].tolist()
        if request.on_token is not None:
            for token in request.tokens:
                request.on_token(token)

    def _padded_inputs(self, batch: list[GenerationRequest]) -> dict[str, torch.Tensor]:
        """The batch's inputs: prompts left-padded to the longest, the images of all requests in request order."""
        longest = max(request.prompt_length for request in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)  # (batch, longest)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # (batch, longest)
        for row, request in enumerate(batch):
            ids = request.inputs["input_ids"][0]
            mask = request.inputs.get("attention_mask", torch.ones_like(request.inputs["input_ids"]))[0]
            input_ids[row, longest - len(ids):] = ids
            attention_mask[row, longest - len(ids):] = mask
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        images = [request.inputs["pixel_values"] for request in batch if "pixel_values" in request.inputs]
        if images:
            inputs["pixel_values"] = torch.cat(images)  # (total_images, channels, height, width)
        return {name: value.to(self.model.device) for name, value in inputs.items()}


__all__ = ["BATCHABLE_INPUTS", "BatchSettings", "BatchingGenerator", "GenerationRequest"]
