"""Multi-turn chat over a LLaVA model that reuses the conversation's KV cache (`llava-ext chat` is `cli/chat.py`).

Each turn renders the whole conversation with the processor's chat template, but only the tokens the cache has not
seen go through the model: the image features of earlier turns live in the cache as keys and values, so a follow-up
question about the same image costs a prefill of a few text tokens instead of the vision tower plus the whole prompt.

    turn 1:  [<s> USER: <image>x576 \\n Q1 ASSISTANT:] -> generate -> A1 </s>
              \\______________ prefill (vision tower + text) ______/    \\ decode: the cache grows by one per token

    cache after turn 1 (the last sampled token is not in it; generate never feeds it back):
             [<s> USER: <image>x576 \\n Q1 ASSISTANT: A1]

    turn 2:  [<s> USER: <image>x576 \\n Q1 ASSISTANT: A1 </s> USER: Q2 ASSISTANT:]   (rendered again, tokenized again)
             |<----------- identical to the cached tokens ---------->|<--- new --->|
             `generate(input_ids=all, cache=cache)` prefills only "new" (pixel_values only for images whose
             placeholders are in the new part). The cache is first cut back to the longest common prefix, never in the
             middle of an image's placeholders, so a re-tokenization that differs from the sampled tokens costs a
             partial re-prefill, not a wrong answer.

By default the cache is a `StaticCache` (fixed shapes, grown in blocks of `CACHE_BLOCK` tokens) and the decode step
is `torch.compile`d (on CPU: frozen weights, inductor's C++ GEMM kernels; a bf16/fp16 vision tower is compiled too);
the first answer pays the compile warm-up.

Long conversations: a question that would not fit in the context (the text model's `max_position_embeddings`, or
`max_context`) raises `ContextFullError` before any compute, or makes room by forgetting the oldest turns
(`on_context_full="drop_oldest"`, the CLI's default). An interrupted answer (Ctrl-C, a stream left unfinished) is
forgotten with its question, its generation thread stopped first. `benchmarks/soak_chat.py` measures memory and time
per turn over hundreds of turns.
"""

import contextlib
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, logging,
)

from .compat import CACHE_KWARG, CompileConfig
from .modeling_llava_ext import compiled_for, drop_foreign_compiled_call
from .quantization import stored_bytes

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
CACHE_BLOCK = 1024  # static-cache capacity grows in these steps; each new capacity recompiles the decode step once


# inductor stores a pointwise result instead of inlining it into its readers above this many ops (its CPU default, 50,
# inlines the rotary embedding into the attention scores' loop over the cache; 30 still did, 10 does not)
MATH_ATTENTION_REALIZE_OPCOUNT = 10


def _inductor_with_math_attention(graph, example_inputs, options: dict | None = None):
    """The inductor backend, with `scaled_dot_product_attention` lowered through torch's math backend (matmul, softmax,
    matmul, which inductor then fuses and compiles) instead of a call to the fused CPU kernel."""
    from torch._inductor.compile_fx import compile_fx  # what torch.compile's "inductor" backend calls
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # read while the graph is lowered; the compiled step does not depend on it
        return compile_fx(graph, example_inputs, config_patches=options or {})


def decode_compile_config(device: torch.device, dtype: torch.dtype) -> CompileConfig:
    """Decode-step compile settings: CUDA graphs on CUDA; on CPU, inductor's C++ GEMM kernels on frozen weights.

    Batch-1 decoding on CPU is bound by reading the weights. With the weights frozen into the graph (see
    `decode_compile_settings`), inductor pre-packs them for its own C++ GEMM template, which reads them about twice as
    fast as the MKL GEMV behind `nn.Linear`; the same holds for bf16 weights and for torchao's int8 and int4
    weight-only layers (inductor's int8 / int4 weight-only GEMMs; the int4 one takes bf16 activations and output rows
    in blocks of 64 only, which `quantization.quantize_int4_weight_only` keeps to: a layer with no kernel would fail
    the whole compile). The template is the only GEMM backend offered (`max_autotune_gemm_backends`
    "CPP", not "CPP,ATEN"): with both, inductor times the two per shape once and keeps the winner in its on-disk
    autotune cache, and a timing taken while other work shared the CPU then kept the slower ATen kernel for every later
    chat (measured on a 2-core machine: 26 tok/s instead of 42 on the 256M benchmark model, fp32, until the cache
    was deleted).

    With 16-bit activations (`dtype` bf16 or fp16: bf16, int8 and int4 weight-only models) on CPU, one-token
    attention is lowered to matmul-softmax-matmul: torch's fused CPU attention kernel is about 5x slower than that in
    bf16 for one query over a long cache (measured with torch 2.13: 2.5 ms against 0.45 ms a layer for 16 heads over
    1024 cached positions), while in fp32 it is the faster of the two. There, `realize_opcount_threshold` makes
    inductor store the rotated query once: by default it inlines the rotary embedding (a cos and a sin) into the score
    loop and computes it again for every cached position, which made attention about a third of a bf16 decode step
    (0.55 ms a layer over 1024 positions).

    Args:
        device (`torch.device`): where the model runs.
        dtype (`torch.dtype`): the model's floating dtype (`model.dtype`). Required: the fp32 settings on a bf16 or
            int8 weight-only model compiled a decode step that gave wrong tokens (256M benchmark model, torch 2.13).
    """
    if device.type == "cuda":
        return CompileConfig()
    config = CompileConfig(mode=None, options={"max_autotune": True, "max_autotune_gemm_backends": "CPP"})
    if dtype in (torch.bfloat16, torch.float16):
        config.backend = _inductor_with_math_attention  # one function object: equal configs reuse the compiled step
        config.options["realize_opcount_threshold"] = MATH_ATTENTION_REALIZE_OPCOUNT
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    return config


@contextlib.contextmanager
def decode_compile_settings(device: torch.device) -> Iterator[None]:
    """Compiler settings that must hold while `generate()` traces the decode step; restored afterwards.

    - A compile that fails (no C++ compiler, no triton) is logged by torch and the step runs uncompiled, with the
      same answers, instead of ending the chat.
    - CPU: frozen weights. `freezing` is read when the graph is traced, before `torch.compile`'s per-call options
      apply, so passing it in `decode_compile_config` has no effect. Frozen weights become constants of the compiled
      step: after changing the weights in place, `torch._dynamo.reset()` rebuilds it.
    - CPU: no on-disk graph caches (inductor's FX graph cache, AOTAutograd's cache). Their keys do not cover the
      values of frozen torchao int8 weights: a second int8 model of the same shapes, in the same process or a later
      one, was served the first one's compiled step with the first one's weights in it, and decoded the first model's
      tokens (torch 2.13, torchao 0.18). torchao's int4 weights are tensor subclasses too, under the same rule
      (tested). Plain frozen weights bypass those caches anyway; compiled kernels are still cached.
    """
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with contextlib.ExitStack() as stack:
        stack.enter_context(dynamo_config.patch(suppress_errors=True))
        if device.type == "cpu":
            stack.enter_context(inductor_config.patch(freezing=True, fx_graph_cache=False))
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        yield


def compiles_vision_tower(model) -> bool:
    """Whether ChatSession's compiled path also compiles `model`'s vision tower: on CPU, for a bf16/fp16 tower.

    There the frozen, compiled tower (inductor, oneDNN's pre-packed 16-bit GEMMs, fused norms and activations) is
    about a third faster than eager: 330 ms against 490 ms for a CLIP ViT-B/14 at 336 px in bf16 on 2 cores, a sixth
    of a one-image prefill. An fp32 tower gains about 5%, not worth its compile warm-up; other devices run eager.
    """
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if tower is None or not hasattr(type(tower), "select_hidden_states") or model.device.type != "cpu":
        return False
    return next(tower.parameters()).dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def compiled_vision_tower(model) -> Iterator[None]:
    """While active, `model` runs its vision tower compiled where `compiles_vision_tower` says it pays.

    The compiled tower is made once per tower and kept on it (as transformers keeps a model's compiled decode step);
    it is only called inside this context, so outside it, training included, the tower is the eager module. Enter it
    under `decode_compile_settings`: the weights are frozen into the compiled tower, and after changing them in place
    `torch._dynamo.reset()` rebuilds it.
    """
    if not compiles_vision_tower(model):
        yield
        return
    tower = model.model.vision_tower
    compiled = tower.__dict__.get("_llava_ext_compiled_select")
    if compiled is None or not compiled_for(compiled, tower):  # none yet, or a deep copy's: the original's weights
        compiled = torch.compile(type(tower).select_hidden_states.__get__(tower))
        tower.__dict__["_llava_ext_compiled_select"] = compiled  # a plain attribute: not a submodule, not saved
    tower.__dict__["select_hidden_states"] = compiled  # shadows the class's method for this instance
    try:
        yield
    finally:
        tower.__dict__.pop("select_hidden_states", None)


class UnpinnedStaticCache(StaticCache):
    """A `StaticCache` whose tensors reach a compiled decode step as inputs, never as constants baked into it.

    transformers marks static-cache tensors with `torch._dynamo.mark_static_address`, which serves CUDA graphs. Under
    inductor's weight freezing, dynamo bakes such marked tensors into the graph like weights, so a second cache of the
    same shape would silently be served by the first cache's tensors. Off CUDA the mark buys nothing: it is removed as
    soon as a layer allocates its tensors.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]  # a static cache has all its layers from the start
        allocating = not layer.is_initialized
        result = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if allocating:
            for value in vars(layer).values():
                if isinstance(value, torch.Tensor):
                    value.__dict__.pop("_dynamo_static_input_type", None)  # where mark_static_address keeps the mark
        return result


def new_static_cache(config, max_cache_len: int, device: torch.device) -> StaticCache:
    """The static cache ChatSession decodes into: `UnpinnedStaticCache` on CPU (frozen weights), else `StaticCache`."""
    cache_class = UnpinnedStaticCache if device.type == "cpu" else StaticCache
    return cache_class(config=config, max_cache_len=max_cache_len)


def compile_memory_shortfall(model) -> int:
    """Bytes of free memory missing for compiling the CPU decode step (0 if there is enough).

    The frozen step keeps a pre-packed copy of the weights beside the model's own, and compiling it briefly needs
    about twice that (measured: +0.75 GB kept, +1.4 GB peak for 1 GB of weights). Weights count as stored: int8 and
    int4 weight-only layers (torchao) by their integer data, scales and zero points.
    """
    import psutil  # a dependency of accelerate

    needed = 2 * sum(stored_bytes(parameter) for parameter in model.parameters())
    return max(0, needed - psutil.virtual_memory().available)


def truncate_cache(cache, length: int) -> None:
    """Keep the first `length` positions of `cache` (static or dynamic)."""
    current = int(cache.get_seq_length())
    if current <= length:
        return
    if isinstance(cache, StaticCache):
        # Positions past `length` are masked out and overwritten by the next tokens, so moving the write index is enough.
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
    else:
        cache.crop(length - current)


class ContextFullError(ValueError):
    """The conversation with its new question, plus room for the answer, is longer than the session's context limit.

    Attributes:
        limit (`int`): the context limit in tokens.
        needed (`int`): prompt tokens + `max_new_tokens` for the question that did not fit.
        question_alone (`bool`): even the question with only the system message does not fit, so forgetting earlier
            turns would not help.
    """

    def __init__(self, message: str, limit: int, needed: int, question_alone: bool):
        super().__init__(message)
        self.limit = limit
        self.needed = needed
        self.question_alone = question_alone


class _StopWhenSet(StoppingCriteria):
    """Ends `generate()` at the next token once `event` is set, from any thread."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    r"""
    A conversation with a LLaVA model that keeps its KV cache between turns and feeds `generate()` only new tokens.

    Answers equal those of a fresh `generate()` over the whole rendered conversation (greedy decoding): the cache holds
    exactly the keys and values that a full prefill would compute for the reused prefix.

    Context limit: a question whose prompt plus `max_new_tokens` would pass the limit (`max_context`, by default the
    text model's `max_position_embeddings`) is refused with a [`ContextFullError`] before any compute, or, with
    `on_context_full="drop_oldest"`, the oldest turns (question, its images and answer; the system message stays) are
    forgotten until it fits, fewest first:

        [system] [Q1 img A1] [Q2 A2] [Q3 A3] [Q4 ...max_new_tokens...]   > limit
        [system]             [Q2 A2] [Q3 A3] [Q4 ...max_new_tokens...]   <= limit   (dropped_turns == 1)

    The kept turns now start earlier in the prompt, so that question prefills them again (the cache is reused up to the
    system message); later questions reuse the cache as usual until the next drop.

    Interrupted answers: a question whose answer did not run to its end (an exception or Ctrl-C during `generate()`,
    a stream closed, dropped or interrupted before it was exhausted, or a new question asked before it was) is not
    recorded: the question, its images and the partial answer are forgotten, as if never asked, and the next answer
    equals a fresh session's over the conversation without that turn. A stream's generation thread is stopped at the
    next token and joined first, so the cache is never written behind the next question's back.

    Args:
        model ([`LlavaExtForConditionalGeneration`] or any LLaVA-style generative model):
            The model; its `generate()` is called with the session's KV cache.
        processor ([`LlavaExtProcessor`] or transformers' `LlavaProcessor`):
            Renders the conversation with its chat template and turns text and images into model inputs.
        system (`str`, *optional*):
            A system message put before the first turn.
        cache_implementation (`str`, *optional*, defaults to `"static"`):
            `"static"`: a preallocated cache with fixed shapes, needed for the compiled decode; `"dynamic"`: a cache
            that grows token by token (no compile).
        compile (`bool`, *optional*):
            Compile the decode step (and on CPU a bf16/fp16 vision tower: `compiles_vision_tower`); the first answer
            pays the warm-up (about 20 s for a 256M model on 2 CPU cores, some 15 s more for a bf16 vision tower).
            Defaults to `True` with a static cache, except on a CPU without the free memory for the compiled step's
            pre-packed copy of the weights (about the model's size kept, twice that while compiling). The weights
            are frozen into the compiled step: after changing them in place, call `torch._dynamo.reset()` so the
            step is compiled again. bf16 models and int8 / int4 weight-only ones (`load_model_and_processor(...,
            quantize="int8")` or `"int4"`, `llava_ext.quantization`) decode compiled too, and gain most from it:
            uncompiled, an int8 layer dequantizes its whole weight on every call, and an int4 one goes through
            torchao's tensor subclass to ATen's kernel.
        max_context (`int`, *optional*):
            Context limit in tokens (prompt + answer), at most the text model's `max_position_embeddings`, which is
            the default. A lower limit bounds the cache's memory.
        on_context_full (`str`, *optional*, defaults to `"error"`):
            `"error"`: raise [`ContextFullError`] (the question is not recorded; `reset()` or `drop_oldest_turns()`
            make room); `"drop_oldest"`: forget the oldest turns until the question fits (`dropped_turns` says how
            many the last question forgot).

    Example:

    ```python
    >>> session = ChatSession(model, processor, on_context_full="drop_oldest")
    >>> session.ask("What is in the picture?", images=[image], max_new_tokens=64)
    >>> for chunk in session.ask("And what colour is it?", stream=True):
    ...     print(chunk, end="", flush=True)
    ```
    """

    def __init__(
        self,
        model,
        processor,
        system: str | None = None,
        cache_implementation: Literal["static", "dynamic"] = "static",
        compile: bool | None = None,
        max_context: int | None = None,
        on_context_full: Literal["error", "drop_oldest"] = "error",
    ):
        if cache_implementation not in ("static", "dynamic"):
            raise ValueError(
                f"cache_implementation={cache_implementation!r} is not supported; use 'static' (fixed shapes, "
                "compiled decode) or 'dynamic' (grows token by token)."
            )
        if compile and cache_implementation != "static":
            raise ValueError("compile=True needs cache_implementation='static': a dynamic cache changes shape every token.")
        if on_context_full not in ("error", "drop_oldest"):
            raise ValueError(
                f"on_context_full={on_context_full!r} is not supported; use 'error' (raise ContextFullError) or "
                "'drop_oldest' (forget the oldest turns until the question fits)."
            )
        model_limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if max_context is not None and (max_context < 1 or (model_limit is not None and max_context > model_limit)):
            raise ValueError(
                f"max_context={max_context} must be between 1 and the text model's max_position_embeddings "
                f"({model_limit}); leave it unset to use the latter."
            )
        self.model = model
        self.processor = processor
        self.system = system
        self.cache_implementation = cache_implementation
        if compile is None:
            compile = cache_implementation == "static" and self._memory_allows_compile(model)
        self.compile = compile
        self.max_context = max_context or model_limit
        self._limit_source = "max_context" if max_context else "the text model's max_position_embeddings"
        self.on_context_full = on_context_full
        self.image_token_id = model.config.image_token_id
        self._stream_ref = None  # weak reference to the last streamed answer's iterator
        self._worker = None  # (thread, stop event) of a streamed generation still running
        self._pending_images = None  # images of the question awaiting its answer (None: no question pending)
        self.dropped_turns = 0  # turns the last question forgot to fit in the context (on_context_full="drop_oldest")
        self.reset()

    @staticmethod
    def _memory_allows_compile(model) -> bool:
        if model.device.type != "cpu":
            return True
        shortfall = compile_memory_shortfall(model)
        if shortfall:
            logger.warning(
                f"Not compiling the decode step: on CPU it keeps a pre-packed copy of the weights and needs "
                f"{shortfall / 2**20:,.0f} MiB more free memory than there is; decoding runs uncompiled. Pass "
                "compile=True (`--compile`) to compile anyway."
            )
        return not shortfall

    def reset(self) -> None:
        """Forget the conversation and its images; the cache's memory is kept for the next conversation."""
        self._abandon_unfinished_answer()
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        self.images: list = []
        self._cached_ids = torch.empty(0, dtype=torch.long)  # the tokens whose keys/values the cache holds
        self._cached_multi_image = False  # OneVision: whether the cached images were encoded as a multi-image sample

    def drop_oldest_turns(self, num_turns: int = 1) -> int:
        """Forget the `num_turns` oldest turns (each a question, its images and its answer); the system message stays.

        The next question prefills the kept turns again: they now start earlier in the prompt.

        Returns:
            `int`: the number of turns forgotten (fewer than asked when the conversation has fewer).
        """
        if num_turns < 1:
            raise ValueError(f"num_turns={num_turns} must be at least 1.")
        self._abandon_unfinished_answer()
        return self._drop_turns(num_turns)

    def _drop_turns(self, num_turns: int) -> int:
        """Forget up to `num_turns` answered turns from the start; returns how many."""
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        # After the system message, messages alternate user, assistant; a pending question (no answer yet) stays.
        answered = (len(self.messages) - first - (self._pending_images is not None)) // 2
        dropped = min(num_turns, answered)
        for question in self.messages[first : first + 2 * dropped : 2]:
            del self.images[: sum(part["type"] == "image" for part in question["content"])]
        del self.messages[first : first + 2 * dropped]
        return dropped

    @property
    def cache(self):
        """The KV cache of the conversation so far (None before the first answer)."""
        return getattr(self, "_cache", None)

    def ask(
        self, text: str, images: list | None = None, stream: bool = False, **generate_kwargs
    ) -> str | Iterator[str]:
        """Ask one question and record the answer in the conversation.

        Args:
            text (`str`): the question.
            images (`list` of images, *optional*): images for this turn (PIL images, arrays, paths or URLs as the
                processor takes them); each gets an `<image>` placeholder before the question's text.
            stream (`bool`, *optional*, defaults to `False`): return an iterator of text chunks as they are generated.
                The answer enters the conversation once the iterator is exhausted; closing, dropping or interrupting
                it before then stops the generation and forgets the question (see the class docstring).
            generate_kwargs: passed to `generate()` (`max_new_tokens` defaults to 256, decoding to greedy).

        Returns:
            `str` (the answer, stripped) or, with `stream=True`, an iterator of `str` chunks.

        Raises:
            [`ContextFullError`]: the question does not fit in the context (with `on_context_full="error"`, or when it
                would not fit even alone); the question is not recorded.
        """
        self._abandon_unfinished_answer()
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images.extend(images)
        self._pending_images = len(images)
        self.dropped_turns = 0
        try:
            kwargs, prompt_length = self._prepare_generate(generate_kwargs)
        except BaseException:
            self._forget_question(cache_valid=True)  # nothing ran: the cache still holds exactly `_cached_ids`
            raise
        if stream:
            iterator = self._stream(kwargs, prompt_length)
            self._stream_ref = weakref.ref(iterator)
            return iterator
        try:
            with self._compile_settings():
                sequences = self.model.generate(**kwargs)
        except BaseException:  # KeyboardInterrupt included: the cache may be half-written
            self._forget_question(cache_valid=False)
            raise
        return self._finish(sequences, prompt_length)

    @contextlib.contextmanager
    def _compile_settings(self) -> Iterator[None]:
        if not self.compile:
            yield
            return
        with decode_compile_settings(self.model.device), compiled_vision_tower(self.model):
            yield

    def _forget_question(self, cache_valid: bool) -> None:
        """Undo the pending question, which got no recorded answer; an invalid cache is not reused."""
        if self._pending_images is not None:
            self.messages.pop()
            del self.images[len(self.images) - self._pending_images :]
            self._pending_images = None
        if not cache_valid:
            self._cached_ids = torch.empty(0, dtype=torch.long)

    def _abandon_unfinished_answer(self) -> None:
        """Settle a streamed answer left unfinished before the conversation changes: stop it, forget its question."""
        iterator = self._stream_ref() if self._stream_ref is not None else None
        self._stream_ref = None
        if iterator is not None:
            iterator.close()  # a started stream stops its thread and forgets its question (see `_stream`)
        if self._worker is not None:  # a stream whose own clean-up was interrupted (a second Ctrl-C)
            self._stop_worker()
            self._forget_question(cache_valid=False)
        self._forget_question(cache_valid=True)  # a stream never iterated: nothing ran

    def _stop_worker(self) -> None:
        thread, stop = self._worker
        stop.set()
        thread.join()
        self._worker = None

    def _prepare_generate(self, generate_kwargs: dict) -> tuple[dict, int]:
        """Tokenize the conversation, pick the reusable cache prefix, and build `generate()`'s arguments."""
        max_new_tokens = generate_kwargs.pop("max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
        inputs = self._fit_context(max_new_tokens)
        input_ids = inputs["input_ids"]  # (1, seq)
        counts = self._image_token_counts(inputs)
        multi_image = "batch_num_images" in inputs and len(counts) > 1
        cache, reused = self._cache_for(input_ids[0], max_new_tokens, counts, multi_image)
        self._cached_multi_image = multi_image

        kwargs = {
            "input_ids": input_ids.to(self.model.device),
            "attention_mask": torch.ones_like(input_ids, device=self.model.device),
            CACHE_KWARG: cache,  # `cache` on transformers >= 5.24, `past_key_values` before
            "max_new_tokens": max_new_tokens,
        }
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            first_new_image = self._images_before(input_ids[0], reused, counts)
            if first_new_image < pixel_values.shape[0]:
                # (new_images, channels, height, width), anyres (new_images, crops, ...): earlier ones are cached
                kwargs["pixel_values"] = pixel_values[first_new_image:].to(self.model.device, self.model.dtype)
                if "image_sizes" in inputs:  # (new_images, 2)
                    kwargs["image_sizes"] = inputs["image_sizes"][first_new_image:].to(self.model.device)
                if "batch_num_images" in inputs:  # the one sample's new images (at least 2 when multi_image)
                    kwargs["batch_num_images"] = torch.tensor([len(counts) - first_new_image], device=self.model.device)
        if self.compile:
            # our model drops it itself; a stock or older remote-code class would decode with the original's weights
            drop_foreign_compiled_call(self.model)
            kwargs["compile_config"] = decode_compile_config(self.model.device, self.model.dtype)
        elif isinstance(cache, StaticCache):
            kwargs["disable_compile"] = True  # transformers would compile a static cache on CUDA by itself
        if "temperature" in generate_kwargs and "do_sample" not in generate_kwargs:
            generate_kwargs["do_sample"] = generate_kwargs["temperature"] > 0
        kwargs.setdefault("do_sample", False)
        kwargs.update(generate_kwargs)
        return kwargs, input_ids.shape[1]

    def _tokenize(self, messages: list[dict], images: list) -> dict:
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_processor = getattr(self.processor, "image_processor", None)
        if images and "batch_num_images" in getattr(image_processor, "model_input_names", ()):
            images = [images]  # OneVision: the conversation's images are one sample's (a flat list: one image each)
        return self.processor(text=prompt, images=images or None, return_tensors="pt")

    def _fit_context(self, max_new_tokens: int) -> dict:
        """The tokenized conversation, once it fits in the context (forgetting the oldest turns if it must and may)."""
        inputs = self._tokenize(self.messages, self.images)
        limit = self.max_context
        if limit is None or inputs["input_ids"].shape[1] + max_new_tokens <= limit:
            return inputs
        # Before dropping anything: would the question fit with only the system message?
        system = [message for message in self.messages[:1] if message["role"] == "system"]
        question_images = self.images[len(self.images) - self._pending_images :]
        alone = self._tokenize(system + self.messages[-1:], question_images)["input_ids"].shape[1]
        if alone + max_new_tokens > limit:
            raise ContextFullError(
                f"This question alone is {alone} tokens (with the system message and its images' placeholders); with "
                f"max_new_tokens={max_new_tokens} it needs {alone + max_new_tokens}, more than the context limit of "
                f"{limit} tokens ({self._limit_source}). Shorten the question, send fewer images or lower "
                "max_new_tokens.",
                limit, alone + max_new_tokens, question_alone=True,
            )
        if self.on_context_full == "error":
            length = inputs["input_ids"].shape[1]
            turns = sum(message["role"] == "assistant" for message in self.messages)
            smaller = f", lower max_new_tokens (at most {limit - length} fit)" if length < limit else ""
            raise ContextFullError(
                f"The conversation ({turns} turns and this question) is {length} tokens; with "
                f"max_new_tokens={max_new_tokens} it needs {length + max_new_tokens}, more than the context limit of "
                f"{limit} tokens ({self._limit_source}). Call reset() to start a new conversation or "
                f"drop_oldest_turns() to forget the oldest turns{smaller}, or create the session with "
                "on_context_full='drop_oldest' to forget them by itself.",
                limit, length + max_new_tokens, question_alone=False,
            )
        while inputs["input_ids"].shape[1] + max_new_tokens > limit:  # ends: the question alone fits
            self.dropped_turns += self._drop_turns(1)
            inputs = self._tokenize(self.messages, self.images)
        logger.info(f"Context full: forgot the {self.dropped_turns} oldest turn(s) to fit in {limit} tokens")
        return inputs

    def _cache_for(self, input_ids: torch.Tensor, max_new_tokens: int, counts: list[int], multi_image: bool):
        """The cache cut back to the longest reusable prefix of `input_ids` (seq,), and that prefix's length."""
        reused = self._reusable_length(input_ids, counts, multi_image)
        needed = input_ids.shape[0] + max_new_tokens
        cache = self.cache
        if self.cache_implementation == "static":
            if cache is None or cache.get_max_length() < needed:
                capacity = -(-needed // CACHE_BLOCK) * CACHE_BLOCK
                if self.max_context is not None:
                    capacity = min(capacity, max(self.max_context, needed))  # no room past the context limit
                cache = new_static_cache(self.model.config, capacity, self.model.device)
                reused = 0
        elif cache is None:
            cache = DynamicCache(config=self.model.config)
        # Shorten the ids before the cache: interrupted in between, the ids still name only positions the cache holds.
        self._cached_ids = self._cached_ids[:reused]
        self._cache = cache
        truncate_cache(cache, reused)
        return cache, reused

    def _reusable_length(self, input_ids: torch.Tensor, counts: list[int], multi_image: bool = False) -> int:
        """Length of the cached prefix of `input_ids` (seq,) that can stay: shared, not ending inside an image.

        `counts` are the images' placeholder counts (`_image_token_counts`). OneVision encodes the images of a sample
        with several differently (base view only) than a lone image, under the same placeholder ids: when
        `multi_image` changed since the cache was filled, no cached image is reused; and a lone new image beside
        cached ones is sent with the image before it, so the model sees a multi-image sample (`batch_num_images`).
        """
        cached = self._cached_ids
        length = min(cached.shape[0], input_ids.shape[0] - 1)  # at least one token must go through the model
        mismatch = (cached[:length] != input_ids[:length]).nonzero()
        if mismatch.numel():
            length = int(mismatch[0, 0])
        if not counts:
            return length
        # Never split an image's placeholders: the model scatters whole images into them.
        starts = self._image_starts(input_ids, counts)  # first placeholder position of each image
        ends = [start + count for start, count in zip(starts, counts)]
        inside = next((index for index, (start, end) in enumerate(zip(starts, ends)) if start < length < end), None)
        if inside is not None:
            length = starts[inside]
        if multi_image != self._cached_multi_image:
            length = min(length, starts[0])
        elif multi_image and self._images_before(input_ids, length, counts) == len(counts) - 1:
            length = min(length, starts[-2])
        return length

    def _image_token_counts(self, inputs: dict) -> list[int]:
        """Placeholder tokens of each image of the tokenized conversation `inputs`, in order.

        LLaVA-1.5 gives every image the same count. Anyres models (NeXT, OneVision) give each its own, from its
        original size (`image_sizes`): the model says how many when it can (`num_image_tokens`), else each image is
        one run of placeholders (the bundled templates put text between images).
        """
        if not self.images:
            return []
        is_image = inputs["input_ids"][0] == self.image_token_id  # (seq,)
        total = int(is_image.sum())
        if "image_sizes" not in inputs:
            return [total // len(self.images)] * len(self.images)
        counter = getattr(getattr(self.model, "model", None), "num_image_tokens", None)
        image_kwargs = {key: inputs[key] for key in ("batch_num_images",) if key in inputs}
        counts = None
        if counter is not None:
            strategy = self.model.config.vision_feature_select_strategy
            counts = counter(inputs["image_sizes"], strategy, **image_kwargs)
        if counts is None:  # (seq + 1,): +1 where a run of placeholders starts, -1 where one ends
            edges = torch.diff(is_image.long(), prepend=is_image.new_zeros(1).long(), append=is_image.new_zeros(1).long())
            counts = ((edges == -1).nonzero()[:, 0] - (edges == 1).nonzero()[:, 0]).tolist()
        if len(counts) != len(self.images) or sum(counts) != total:
            raise ValueError(
                f"The conversation has {total} image tokens, which cannot be split into its {len(self.images)} images "
                f"(counted {counts}); use a chat template that puts text between images."
            )
        return [int(count) for count in counts]

    def _image_starts(self, input_ids: torch.Tensor, counts: list[int]) -> list[int]:
        """The position of each image's first placeholder in `input_ids` (seq,)."""
        positions = (input_ids == self.image_token_id).nonzero()[:, 0]  # (total placeholders,)
        firsts = [0] + torch.tensor(counts).cumsum(0)[:-1].tolist()
        return [int(positions[first]) for first in firsts]

    def _images_before(self, input_ids: torch.Tensor, length: int, counts: list[int]) -> int:
        """How many images have their placeholders in `input_ids[:length]` (whole images only, see above)."""
        if not counts:
            return 0
        cached = int((input_ids[:length] == self.image_token_id).sum())
        return int((torch.tensor(counts).cumsum(0) <= cached).sum())

    def _record_cached_ids(self, sequences: torch.Tensor) -> torch.Tensor:
        """Note which tokens (prompt + answer but its last token) the cache now holds; returns `sequences[0]` on CPU."""
        sequences = sequences[0].cpu()  # (prompt + new,)
        self._cached_ids = sequences[: int(self.cache.get_seq_length())]
        return sequences

    def _finish(self, sequences: torch.Tensor, prompt_length: int) -> str:
        """Record the answer and the cached tokens; return the answer text."""
        sequences = self._record_cached_ids(sequences)
        answer = self.processor.tokenizer.decode(sequences[prompt_length:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self._pending_images = None
        return answer

    def _stream(self, kwargs: dict, prompt_length: int) -> Iterator[str]:
        """Run `generate()` in a thread and yield its text as it comes; a stop before the end forgets the question.

            main thread (consumer)                  generation thread
            for chunk in streamer: yield  <-------  generate(streamer=..., stopping_criteria=[..., stop])
            GeneratorExit / KeyboardInterrupt:
                stop.set() ------------------------> ends after the current token (the cache stays consistent)
                thread.join(); forget the question
        """
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        criteria = kwargs.get("stopping_criteria") or []
        kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, _StopWhenSet(stop)])
        result = {}

        def run():
            try:
                with self._compile_settings():
                    result["sequences"] = self.model.generate(**kwargs, streamer=streamer)
            except BaseException as error:  # re-raised in the consuming thread
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        self._worker = (thread, stop)
        thread.start()
        try:
            # The answer is recorded stripped; stream the same text: drop leading whitespace, hold trailing
            # whitespace back until more text follows it.
            held = None
            for chunk in streamer:
                chunk = chunk.lstrip() if held is None else held + chunk
                text = chunk.rstrip()
                if text:
                    yield text
                held = chunk[len(text) :] if text or held is not None else None
            thread.join()
        except BaseException:  # GeneratorExit (closed or dropped early), KeyboardInterrupt (Ctrl-C while waiting)
            self._stop_worker()
            if "sequences" in result:  # generate() returned: the cache holds the prompt and the partial answer
                self._record_cached_ids(result["sequences"])
            self._forget_question(cache_valid="sequences" in result)
            raise
        self._worker = None
        if "error" in result:
            self._forget_question(cache_valid=False)
            raise result["error"]
        self._finish(result["sequences"], prompt_length)


# ---------------------------------------------------------------------------------------------------------------
# Loading a checkpoint (`llava-ext chat` is `cli/chat.py`)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_processor(
    model_id: str,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantize: Literal["int8", "int4"] | None = None,
):
    """Load a LLaVA model and its processor; llava_ext checkpoints load with the installed classes (no remote code).

    Args:
        model_id (`str`): local directory or Hub id.
        device (`str`, *optional*): "cpu" or "cuda"; default cuda when available.
        dtype (`str`, *optional*, defaults to `"auto"`): a key of `DTYPES`. `"auto"` is the checkpoint's dtype, except
            with `quantize="int8"`: then bf16 where the device computes it natively (a CPU with AVX512-BF16 / AMX, a
            GPU with bf16), else fp32 on a CPU and fp16 on a GPU (`quantization.int8_default_dtype`); and with
            `quantize="int4"`, which computes in bf16 only: then bf16.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow code shipped with other checkpoints.
        quantize (`str`, *optional*): `None` (as saved), `"int8"` or `"int4"`, applied while loading (transformers'
            `TorchAoConfig`); the vision tower and projector stay in `dtype`. Needs torchao (`pip install
            'llava-ext[quant]'`).
            `"int8"`: torchao int8 weight-only for the language model's linears and lm_head. The model then saves and
            loads back quantized with `save_pretrained` / `from_pretrained`; a checkpoint saved that way loads
            quantized with either value. Decoding is fast only compiled (`ChatSession`'s default); uncompiled, each
            layer dequantizes its weight on every call.
            `"int4"` (CPU, bf16): torchao int4 weight-only for the language model's linears, in groups of
            `quantization.INT4_DEFAULT_GROUP_SIZE` input channels, lm_head in int8
            (`quantization.int4_weight_only_config(config)`; a linear whose shape int4 cannot take stays bf16, with a
            warning). It cannot be saved (torchao 0.18): load the floating checkpoint with `quantize="int4"` each
            time. Fast only compiled, as int8.

    Returns:
        `(model, processor)`, the model in eval mode on `device`.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .convert.io import check_checkpoint_files
    from .processing_llava_ext import LlavaExtProcessor
    from .quantization import (
        INT4_DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES, _require_torchao, int4_unfit_linear_names,
        int4_weight_only_config, int8_default_dtype, int8_linear_names, int8_weight_only_config,
        warn_about_unfit_int4_linears,
    )

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(
            f"quantize={quantize!r} is not supported; use None (the checkpoint's weights as saved), 'int8' (torchao "
            "int8 weight-only for the language model) or 'int4' (torchao int4 weight-only, CPU only)."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use --device cpu.")
    if quantize == "int4" and device != "cpu":
        raise ValueError(
            f"quantize='int4' packs weights for torchao's CPU int4 kernel, so it runs on CPU only, and "
            f"device={device!r}; use --device cpu, or quantize='int8' on the GPU."
        )
    if quantize == "int4" and dtype not in ("auto", "bfloat16"):
        raise ValueError(
            f"quantize='int4' computes in bf16 (the compiled decode's int4 GEMM takes bf16 activations only), and "
            f"dtype={dtype!r}; use dtype 'auto' or 'bfloat16' (--dtype), or quantize='int8'."
        )
    if quantize is not None:
        _require_torchao(f"quantize={quantize!r}")
    if Path(model_id).is_dir():  # a truncated or missing file is named before anything loads
        check_checkpoint_files(model_id)
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    kwargs = {}
    if quantize is not None:
        saved = getattr(config, "quantization_config", None)  # a dict as in config.json, for a quantized checkpoint
        saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
        if saved is None and quantize == "int8":
            kwargs["quantization_config"] = int8_weight_only_config()
        elif saved is None:
            kwargs["quantization_config"] = int4_weight_only_config(config, trust_remote_code=trust_remote_code)
        elif quantize != "int8" or "Int8WeightOnlyConfig" not in str(saved.get("quant_type")):
            # (saved int8 with quantize="int8" loads quantized as is)
            raise ValueError(
                f"{model_id!r} is already quantized ({saved.get('quant_method')}: {saved.get('quant_type')}); "
                f"quantize={quantize!r} quantizes floating-point weights, so leave quantize unset to load it as saved."
            )
    torch_dtype = DTYPES[dtype]
    if quantize is not None and dtype == "auto":
        torch_dtype = int8_default_dtype(device) if quantize == "int8" else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    if quantize == "int8" and not int8_linear_names(model):
        raise ValueError(
            f"quantize='int8' found no linear layer to quantize in {model_id!r} ({type(model).__name__}) outside "
            "the vision tower and projector; load it with quantize=None."
        )
    if quantize == "int4":  # (int4_weight_only_config refused a model with no linear int4 takes)
        warn_about_unfit_int4_linears(model, int4_unfit_linear_names(model), INT4_DEFAULT_GROUP_SIZE)
    model = model.to(device).eval()
    if config.model_type == "llava_ext":
        processor = LlavaExtProcessor.from_pretrained(model_id)
    else:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model, processor


__all__ = [
    "CACHE_BLOCK", "ChatSession", "ContextFullError", "compile_memory_shortfall", "compiled_vision_tower",
    "compiles_vision_tower", "decode_compile_config", "decode_compile_settings", "load_model_and_processor",
    "new_static_cache", "truncate_cache", "UnpinnedStaticCache",
]
