"""Soak test of a long `ChatSession`: resident memory and time per turn over hundreds of turns of a tiny model.

A leak (tensors, threads or compiled graphs kept per turn) shows as a rising RSS; a turn that does more than its new
tokens (re-prefilling the conversation, a cache copied per turn) shows as time growing faster than the context. Per
turn the script records the context length (tokens the cache holds), the wall and CPU time of `ask()` and of the
`generate()` inside it, and the RSS after a `gc.collect()` and glibc's `malloc_trim`, then reports, over turns >=
--fit-from (time figures on the process's CPU time unless `--clock wall`: other processes on a shared machine slow
the wall clock, not the CPU time; one torch thread by default, so that no thread spins waiting on another):

    RSS slope                rss_mb ~ a + slope * turn                                       (KB per turn)
    ms per 1k context        seconds ~ a + b * context_tokens, for the turn and for generate() alone
    residual trend           (seconds - fit) ~ c + d * turn                                  (us per turn)
    growth                   fastest turn of the last quarter / fastest of the first, for the turn and for
                             generate(), beside the context's growth between those quarters

The context grows with the turns, so the time-on-context fit takes up the attention's and the re-tokenization's
linear growth, and the residual shows what is left: a curve (a linear drift hides in the fit, the turn index and the
context growing together). The growth figures compare the fastest turns of two quarters, which keeps them steady
when a few turns are slowed. Turns where a static cache grows (a new capacity, one full re-prefill) are listed and
left out of the time figures.

    python benchmarks/soak_chat.py                                   # 200 turns, static cache, no compile
    python benchmarks/soak_chat.py --turns 300 --cache dynamic --json soak.json
    python benchmarks/soak_chat.py --max-context 512                 # drop_oldest: a full context, turn after turn
"""

import argparse
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Literal

import psutil
import torch
from PIL import Image
from transformers import StaticCache

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.chat import ChatSession
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor
from llava_ext.processing_llava_ext import LlavaExtProcessor

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import build_tiny_tokenizer, tiny_llava_config  # noqa: E402  (the tests' tiny fixtures, not a copy)

# Questions of varied length, so the context does not grow in lockstep with the turn index.
QUESTIONS = ["What is it?", "Why is it red?", "And then?", "Describe the left half of the picture in detail.", "Ok."]


def tiny_model_and_processor(max_position_embeddings: int = 32768):
    """The tests' tiny LLaVA (tests/conftest.py: CLIP 32/8, 2-layer Llama, character tokenizer), with room for a long
    conversation (one character is one token)."""
    config = tiny_llava_config()
    config.text_config.max_position_embeddings = max_position_embeddings
    torch.manual_seed(0)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict())).eval()
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaExtProcessor(
        image_processor, build_tiny_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's `malloc_trim`), so the RSS follows live memory, not the
    high-water mark of the per-turn temporaries (masks, logits), which grow with the context. No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def soak(session: ChatSession, turns: int, max_new_tokens: int, image=None, on_turn=None) -> list[dict]:
    """Ask `turns` questions (the first with `image`); per turn: context tokens, wall and CPU seconds (all of `ask()`,
    and of that the model's `generate()`), RSS (MB) and the static cache's capacity.

    `on_turn(turn)`, if given, runs after each turn before the RSS is read (the tests inject a leak through it).
    """
    process = psutil.Process()
    model = session.model
    generate_seconds = []  # (wall, CPU) of each generate() call in a turn

    def timed_generate(*args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            generate_seconds.append((time.perf_counter() - start, time.process_time() - cpu_start))

    model.generate = timed_generate  # an instance attribute, removed below
    records = []
    gc.collect()
    gc.freeze()  # the objects from before the soak are not its garbage: keep the per-turn collections short
    try:
        for turn in range(turns):
            question = f"{QUESTIONS[turn % len(QUESTIONS)]} ({turn})"
            images = [image] if turn == 0 and image is not None else None
            generate_seconds.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
            session.ask(question, images=images, max_new_tokens=max_new_tokens)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if on_turn is not None:
                on_turn(turn)
            gc.collect()  # garbage in reference cycles is not a leak: collect it before reading the RSS
            release_free_heap()
            cache = session.cache
            records.append({
                "turn": turn,
                "context_tokens": int(session._cached_ids.shape[0]),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "generate_seconds": sum(wall for wall, _ in generate_seconds),
                "generate_cpu_seconds": sum(cpu for _, cpu in generate_seconds),
                "rss_mb": process.memory_info().rss / 2**20,
                "capacity": int(cache.get_max_length()) if isinstance(cache, StaticCache) else None,
                "dropped_turns": session.dropped_turns,
            })
    finally:
        gc.unfreeze()
        del model.generate
    return records


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares `(intercept, slope)` of y on x; slope 0 for a constant x."""
    if len(set(x)) < 2:
        return statistics.fmean(y), 0.0
    slope, intercept = statistics.linear_regression(x, y)
    return intercept, slope


def kv_bytes_per_token(model) -> int:
    """Bytes the KV cache holds per token: keys and values of every layer."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * model.dtype.itemsize


def summarize(records: list[dict], fit_from: int, kv_bytes: int, clock: Literal["cpu", "wall"] = "cpu") -> dict:
    """The figures described in the module docstring, from `soak()`'s records (`kv_bytes`: KV cache bytes per token),
    the time figures on the process's CPU time (what other processes on the machine do not change) or wall time."""
    kept = [record for record in records if record["turn"] >= fit_from]
    _, rss_slope = linear_fit([record["turn"] for record in kept], [record["rss_mb"] for record in kept])
    # A turn whose static cache got a new capacity re-prefills everything once: an expected one-off, not growth.
    # (Turns that drop old turns to fit, on_context_full="drop_oldest", stay in: once the context is full every
    # turn does, and re-prefills the kept turns.)
    regrown = {
        record["turn"] for previous, record in zip(records, records[1:]) if record["capacity"] != previous["capacity"]
    }
    steady = [record for record in kept if record["turn"] not in regrown]
    context = [record["context_tokens"] for record in steady]
    prefix = "cpu_" if clock == "cpu" else ""
    seconds = [record[f"{prefix}seconds"] for record in steady]
    generate = [record[f"generate_{prefix}seconds"] for record in steady]
    intercept, per_token = linear_fit(context, seconds)
    _, generate_per_token = linear_fit(context, generate)
    residuals = [s - (intercept + per_token * c) for s, c in zip(seconds, context)]
    _, residual_trend = linear_fit([record["turn"] for record in steady], residuals)
    quarter = max(len(steady) // 4, 1)
    tokens_per_turn = (kept[-1]["context_tokens"] - kept[0]["context_tokens"]) / max(len(kept) - 1, 1)
    return {
        "turns": len(records),
        "fit_from": fit_from,
        "rss_first_mb": records[0]["rss_mb"],
        "rss_last_mb": records[-1]["rss_mb"],
        "rss_slope_mb_per_turn": rss_slope,
        # what the conversation itself adds per turn: its new tokens' keys and values
        "kv_cache_mb_per_turn": tokens_per_turn * kv_bytes / 2**20,
        "context_tokens_first": kept[0]["context_tokens"],
        "context_tokens_last": kept[-1]["context_tokens"],
        "clock": clock,
        "median_turn_s": statistics.median(seconds),
        "median_turn_wall_s": statistics.median(record["seconds"] for record in steady),
        "turn_ms_per_1k_context_tokens": per_token * 1e6,
        "generate_ms_per_1k_context_tokens": generate_per_token * 1e6,
        "residual_trend_us_per_turn": residual_trend * 1e6,
        # medians of the first and last quarter's residuals: a curve the linear fit leaves over
        "residual_last_minus_first_quarter_ms": (
            statistics.median(residuals[-quarter:]) - statistics.median(residuals[:quarter])
        ) * 1000,
        # the model's own time per turn, fastest of the last quarter over fastest of the first (the fastest turn is
        # the one least slowed by other processes); the context grows about 4x in between at the defaults
        "generate_growth": min(generate[-quarter:]) / min(generate[:quarter]),
        # the same for the whole turn, beside the context's own growth between those quarters
        "turn_growth": min(seconds[-quarter:]) / min(seconds[:quarter]),
        "context_growth": statistics.fmean(context[-quarter:]) / statistics.fmean(context[:quarter]),
        "regrown_turns": sorted(regrown),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--fit-from", type=int, default=50, help="first turn of the fits (earlier ones warm up)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--cache", choices=["static", "dynamic"], default="static")
    parser.add_argument("--compile", action="store_true", help="compiled decode (each new cache capacity recompiles)")
    parser.add_argument("--max-context", type=int, default=None, help="context limit; turns are dropped to fit it")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="the time figures' clock")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--json", default=None, help="also write the figures and per-turn records here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = tiny_model_and_processor()
    session = ChatSession(
        model, processor, cache_implementation=args.cache, compile=args.compile, max_context=args.max_context,
        on_context_full="drop_oldest",
    )
    records = soak(session, args.turns, args.max_new_tokens, image=Image.new("RGB", (40, 40), (200, 30, 30)))
    figures = summarize(records, args.fit_from, kv_bytes_per_token(model), args.clock)
    print(f"{figures['turns']} turns ({args.cache} cache, compile={args.compile}, {args.threads} thread(s)), fits over "
          f"turns >= {args.fit_from}, times on the {args.clock} clock")
    print(f"RSS: {figures['rss_first_mb']:.1f} MB after turn 0, {figures['rss_last_mb']:.1f} MB at the end; slope "
          f"{figures['rss_slope_mb_per_turn'] * 1024:+.1f} KB/turn (the KV cache's own growth: "
          f"{figures['kv_cache_mb_per_turn'] * 1024:.1f} KB/turn)")
    print(f"context: {figures['context_tokens_first']} -> {figures['context_tokens_last']} tokens; median turn "
          f"{figures['median_turn_s'] * 1000:.1f} ms ({figures['median_turn_wall_s'] * 1000:.1f} ms wall); per 1k "
          f"context tokens: turn "
          f"{figures['turn_ms_per_1k_context_tokens']:+.2f} ms, of which generate() "
          f"{figures['generate_ms_per_1k_context_tokens']:+.2f} ms")
    print(f"fastest turn, last quarter over first: x{figures['turn_growth']:.2f} (context x"
          f"{figures['context_growth']:.2f}), of generate() alone: x{figures['generate_growth']:.2f}")
    print(f"residual of the turn time: trend {figures['residual_trend_us_per_turn']:+.2f} us/turn, last - first "
          f"quarter {figures['residual_last_minus_first_quarter_ms']:+.2f} ms")
    print(f"turns left out of the time fits (re-prefill after a cache regrowth): {figures['regrown_turns']}")
    if args.max_context:
        full = [record for record in records if record["dropped_turns"]]
        print(f"context limit {args.max_context}: {len(full)} turns dropped old turns to fit, from turn "
              f"{full[0]['turn'] if full else None}; their median time "
              f"{statistics.median(r['seconds'] for r in full) * 1000 if full else float('nan'):.1f} ms")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"figures": figures, "records": records}, file, indent=1)


if __name__ == "__main__":
    main()
