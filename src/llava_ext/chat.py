"""Multi-turn chat over a LLaVA model that reuses the conversation's KV cache, and the `llava-ext chat` command.

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
is `torch.compile`d (on CPU: frozen weights, inductor's C++ GEMM kernels); the first answer pays the compile warm-up.
"""

import argparse
import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Literal

import torch
from transformers import DynamicCache, StaticCache, TextIteratorStreamer, logging

from .compat import CACHE_KWARG, CompileConfig, load_image

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
CACHE_BLOCK = 1024  # static-cache capacity grows in these steps; each new capacity recompiles the decode step once


def decode_compile_config(device: torch.device) -> CompileConfig:
    """Decode-step compile settings: CUDA graphs on CUDA; on CPU, inductor's C++ GEMM kernels on frozen weights.

    Batch-1 decoding on CPU is bound by reading the weights. With the weights frozen into the graph (see
    `decode_compile_settings`), `max_autotune` lets inductor pre-pack them for its own C++ GEMM template, which reads
    them about twice as fast as the MKL GEMV behind `nn.Linear`; autotuning still keeps ATen where it is faster.
    """
    if device.type == "cuda":
        return CompileConfig()
    config = CompileConfig(mode=None, options={"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})
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
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    frozen_weights = inductor_config.patch(freezing=True) if device.type == "cpu" else contextlib.nullcontext()
    with dynamo_config.patch(suppress_errors=True), frozen_weights:
        yield


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
    about twice that (measured: +0.75 GB kept, +1.4 GB peak for 1 GB of weights).
    """
    import psutil  # a dependency of accelerate

    needed = 2 * sum(parameter.nbytes for parameter in model.parameters())
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


class ChatSession:
    r"""
    A conversation with a LLaVA model that keeps its KV cache between turns and feeds `generate()` only new tokens.

    Answers equal those of a fresh `generate()` over the whole rendered conversation (greedy decoding): the cache holds
    exactly the keys and values that a full prefill would compute for the reused prefix.

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
            Compile the decode step; the first answer pays the warm-up (about 20 s for a 256M model on 2 CPU cores).
            Defaults to `True` with a static cache, except on a CPU without the free memory for the compiled step's
            pre-packed copy of the weights (about the model's size kept, twice that while compiling). The weights
            are frozen into the compiled step: after changing them in place, call `torch._dynamo.reset()` so the
            step is compiled again.

    Example:

    ```python
    >>> session = ChatSession(model, processor)
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
    ):
        if cache_implementation not in ("static", "dynamic"):
            raise ValueError(
                f"cache_implementation={cache_implementation!r} is not supported; use 'static' (fixed shapes, "
                "compiled decode) or 'dynamic' (grows token by token)."
            )
        if compile and cache_implementation != "static":
            raise ValueError("compile=True needs cache_implementation='static': a dynamic cache changes shape every token.")
        self.model = model
        self.processor = processor
        self.system = system
        self.cache_implementation = cache_implementation
        if compile is None:
            compile = cache_implementation == "static" and self._memory_allows_compile(model)
        self.compile = compile
        self.image_token_id = model.config.image_token_id
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
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        self.images: list = []
        self._cached_ids = torch.empty(0, dtype=torch.long)  # the tokens whose keys/values the cache holds

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
            stream (`bool`, *optional*, defaults to `False`): return an iterator of text chunks as they are generated
                (the answer enters the conversation once the iterator is exhausted).
            generate_kwargs: passed to `generate()` (`max_new_tokens` defaults to 256, decoding to greedy).

        Returns:
            `str` (the answer, stripped) or, with `stream=True`, an iterator of `str` chunks.
        """
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images.extend(images)
        try:
            kwargs, prompt_length = self._prepare_generate(generate_kwargs)
        except BaseException:
            self._forget_question(len(images))
            raise
        if stream:
            return self._stream(kwargs, prompt_length, len(images))
        try:
            with self._compile_settings():
                sequences = self.model.generate(**kwargs)
        except BaseException:
            self._forget_question(len(images))
            raise
        return self._finish(sequences, prompt_length)

    def _compile_settings(self):
        return decode_compile_settings(self.model.device) if self.compile else contextlib.nullcontext()

    def _forget_question(self, num_images: int) -> None:
        """Undo a question that got no answer; the cache may be half-written, so it is not trusted."""
        self.messages.pop()
        del self.images[len(self.images) - num_images :]
        self._cached_ids = torch.empty(0, dtype=torch.long)

    def _prepare_generate(self, generate_kwargs: dict) -> tuple[dict, int]:
        """Tokenize the conversation, pick the reusable cache prefix, and build `generate()`'s arguments."""
        prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=prompt, images=self.images or None, return_tensors="pt")
        input_ids = inputs["input_ids"]  # (1, seq)
        max_new_tokens = generate_kwargs.pop("max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
        cache, reused = self._cache_for(input_ids[0], max_new_tokens)

        kwargs = {
            "input_ids": input_ids.to(self.model.device),
            "attention_mask": torch.ones_like(input_ids, device=self.model.device),
            CACHE_KWARG: cache,  # `cache` on transformers >= 5.24, `past_key_values` before
            "max_new_tokens": max_new_tokens,
        }
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            first_new_image = self._images_before(input_ids[0], reused)
            if first_new_image < pixel_values.shape[0]:
                # (new_images, channels, height, width): earlier images are already in the cache
                kwargs["pixel_values"] = pixel_values[first_new_image:].to(self.model.device, self.model.dtype)
        if self.compile:
            kwargs["compile_config"] = decode_compile_config(self.model.device)
        elif isinstance(cache, StaticCache):
            kwargs["disable_compile"] = True  # transformers would compile a static cache on CUDA by itself
        if "temperature" in generate_kwargs and "do_sample" not in generate_kwargs:
            generate_kwargs["do_sample"] = generate_kwargs["temperature"] > 0
        kwargs.setdefault("do_sample", False)
        kwargs.update(generate_kwargs)
        return kwargs, input_ids.shape[1]

    def _cache_for(self, input_ids: torch.Tensor, max_new_tokens: int):
        """The cache cut back to the longest reusable prefix of `input_ids` (seq,), and that prefix's length."""
        reused = self._reusable_length(input_ids)
        needed = input_ids.shape[0] + max_new_tokens
        cache = self.cache
        if self.cache_implementation == "static":
            if cache is None or cache.get_max_length() < needed:
                capacity = -(-needed // CACHE_BLOCK) * CACHE_BLOCK
                cache = new_static_cache(self.model.config, capacity, self.model.device)
                reused = 0
        elif cache is None:
            cache = DynamicCache(config=self.model.config)
        self._cache = cache
        truncate_cache(cache, reused)
        self._cached_ids = self._cached_ids[:reused]
        return cache, reused

    def _reusable_length(self, input_ids: torch.Tensor) -> int:
        """Length of the cached prefix of `input_ids` (seq,) that can stay: shared, not ending inside an image."""
        cached = self._cached_ids
        length = min(cached.shape[0], input_ids.shape[0] - 1)  # at least one token must go through the model
        mismatch = (cached[:length] != input_ids[:length]).nonzero()
        if mismatch.numel():
            length = int(mismatch[0, 0])
        # Never split an image's placeholders: the model scatters whole images into them.
        is_image = input_ids == self.image_token_id  # (seq,)
        if length > 0 and is_image[length - 1] and is_image[length]:
            per_image = self._tokens_per_image(input_ids)
            complete = int(is_image[:length].sum()) // per_image * per_image
            image_positions = is_image.nonzero()[:, 0]
            length = int(image_positions[complete]) if complete < image_positions.shape[0] else length
        return length

    def _tokens_per_image(self, input_ids: torch.Tensor) -> int:
        return int((input_ids == self.image_token_id).sum()) // max(len(self.images), 1)

    def _images_before(self, input_ids: torch.Tensor, length: int) -> int:
        """How many images have their placeholders in `input_ids[:length]` (whole images only, see above)."""
        if not self.images:
            return 0
        return int((input_ids[:length] == self.image_token_id).sum()) // self._tokens_per_image(input_ids)

    def _finish(self, sequences: torch.Tensor, prompt_length: int) -> str:
        """Record the answer and the cached tokens; return the answer text."""
        sequences = sequences[0].cpu()  # (prompt + new,)
        self._cached_ids = sequences[: int(self.cache.get_seq_length())]
        answer = self.processor.tokenizer.decode(sequences[prompt_length:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer

    def _stream(self, kwargs: dict, prompt_length: int, num_images: int) -> Iterator[str]:
        """Run `generate()` in a thread and yield its text as it comes."""
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def run():
            try:
                with self._compile_settings():
                    result["sequences"] = self.model.generate(**kwargs, streamer=streamer)
            except BaseException as error:  # re-raised in the consuming thread
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        # The answer is recorded stripped; stream the same text: drop leading whitespace, hold trailing whitespace
        # back until more text follows it.
        held = None
        for chunk in streamer:
            chunk = chunk.lstrip() if held is None else held + chunk
            text = chunk.rstrip()
            if text:
                yield text
            held = chunk[len(text) :] if text or held is not None else None
        thread.join()
        if "error" in result:
            self._forget_question(num_images)
            raise result["error"]
        self._finish(result["sequences"], prompt_length)


# ---------------------------------------------------------------------------------------------------------------
# `llava-ext chat`

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXAMPLE = (
    "example: llava-ext chat llava-hf/llava-1.5-7b-hf --image https://llava-vl.github.io/static/images/view.jpg "
    "--max-new-tokens 256 --temperature 0 --device cuda --dtype float16"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `chat` subcommand to `llava-ext`'s subparsers."""
    parser = subparsers.add_parser(
        "chat",
        help="chat with a LLaVA model in the terminal (streaming, multi-turn, KV cache reused between turns)",
        description=(
            "Interactive chat: type a question and press Enter; the answer streams as it is generated.\n"
            "Commands: '/image PATH_OR_URL' adds an image to the next question, '/reset' starts a new conversation,\n"
            "'/exit' quits. Questions can come from a pipe too, one a line."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the example on one line
    )
    parser.add_argument("model", metavar="MODEL", help="local checkpoint directory or Hugging Face Hub id")
    parser.add_argument("--image", action="append", default=[], help="image path or URL for the first question")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer length limit")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' dtype (auto: the checkpoint's)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the decode step (static cache; the first answer pays the warm-up). Default: on, except on a "
        "CPU without free memory for the compiled step's pre-packed copy of the weights",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run code shipped with a checkpoint (not needed for llava_ext's own checkpoints)",
    )
    parser.set_defaults(func=run_chat)
    return parser


def load_model_and_processor(
    model_id: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
):
    """Load a LLaVA model and its processor; llava_ext checkpoints load with the installed classes (no remote code).

    Args:
        model_id (`str`): local directory or Hub id.
        device (`str`, *optional*): "cpu" or "cuda"; default cuda when available.
        dtype (`str`, *optional*, defaults to `"auto"`): a key of `DTYPES`.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow code shipped with other checkpoints.

    Returns:
        `(model, processor)`, the model in eval mode on `device`.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .processing_llava_ext import LlavaExtProcessor

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use --device cpu.")
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    model = model.to(device).eval()
    if config.model_type == "llava_ext":
        processor = LlavaExtProcessor.from_pretrained(model_id)
    else:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model, processor


def run_chat(args: argparse.Namespace) -> int:
    """The `llava-ext chat` loop: questions from stdin, streamed answers to stdout, errors to stderr."""
    model, processor = load_model_and_processor(args.model, args.device, args.dtype, args.trust_remote_code)
    session = ChatSession(model, processor, system=args.system, compile=args.compile)
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generate_kwargs["temperature"] = args.temperature
    interactive = sys.stdin.isatty()
    pending = []
    for path in args.image:
        pending.append(load_image(path))
    if interactive:
        print("Type a question; /image PATH adds an image, /reset starts over, /exit quits.", file=sys.stderr)
        if session.compile:
            print("The first answer also compiles the decode step (a one-off wait; --no-compile skips it).",
                  file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            pending = []
            print("[conversation reset]", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                pending.append(load_image(path))
            except Exception as error:  # a bad path must not end the chat
                print(f"could not load image {path!r}: {error}", file=sys.stderr)
            continue
        try:
            for chunk in session.ask(line, images=pending, stream=True, **generate_kwargs):
                print(chunk, end="", flush=True)
        except ValueError as error:
            print(f"\nerror: {error}", file=sys.stderr)
            continue
        finally:
            pending = []
        print(flush=True)
    return 0


__all__ = [
    "CACHE_BLOCK", "ChatSession", "add_parser", "compile_memory_shortfall", "decode_compile_config",
    "decode_compile_settings", "load_model_and_processor", "new_static_cache", "run_chat", "truncate_cache",
    "UnpinnedStaticCache",
]
