"""Long ChatSession conversations stay flat: resident memory and time per turn, measured by benchmarks/soak_chat.py.

Times are the process's CPU time on one torch thread, which other processes on a shared machine do not change.
Thresholds (tiny model, fp32, CPU; figures from `python benchmarks/soak_chat.py`, 200 turns, context 2.2k -> 8.7k
tokens over turns 50-200):
- RSS slope below 50 KB/turn. Measured 20 KB/turn for the static and the dynamic cache, of which the KV cache's own
  growth is 11 KB/turn (43 new tokens a turn, 256 bytes each) and the conversation's text and token ids most of the
  rest. Keeping about 30 KB more a turn crosses it (each turn's prompt ids, 8 bytes a token, would be 17-70 KB
  here); `test_injected_leak_is_measured` shows a 100 KB/turn leak is measured as such.
- Time: the fastest turn of the last quarter over the fastest of the first grows less than 1.5x the context does
  (a turn is a fixed part plus re-tokenizing and attending over the context), and generate()'s alone less than 4x.
  Measured (context x2.7 between the quarters): turn x1.8, generate() x1.5, static and dynamic cache alike. With
  the cache not reused (every turn prefilling the whole conversation): turn x6.9, generate() x7.3.
- The 200-turn runs also bound the turn time's residual drift (after regressing it on the context) to less than a
  median turn over the fitted turns; measured 0.2 us/turn, 0.03 ms over 150 turns.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from conftest import HANG_GUARD_S

from llava_ext.chat import ChatSession

BENCH = Path(__file__).parents[1] / "benchmarks" / "soak_chat.py"
SPEC = importlib.util.spec_from_file_location("soak_chat", BENCH)
soak_chat = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(soak_chat)

RSS_SLOPE_LIMIT_MB = 0.05  # per turn, see the module docstring
GENERATE_GROWTH_LIMIT = 4.0
MAX_NEW_TOKENS = 4  # a tiny random model rarely stops by itself; a turn is its question plus a few tokens


@pytest.fixture
def tiny():
    """The tiny model with room for long conversations, on one torch thread: time is read on the CPU clock, where a
    second thread waiting on the first (spinning) would count too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield soak_chat.tiny_model_and_processor()
    torch.set_num_threads(threads)


def soak(tiny, turns: int, fit_from: int, on_turn=None, **session_kwargs) -> tuple[dict, list[dict]]:
    model, processor = tiny
    session = ChatSession(model, processor, compile=False, **session_kwargs)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    records = soak_chat.soak(session, turns, MAX_NEW_TOKENS, image=image, on_turn=on_turn)
    return soak_chat.summarize(records, fit_from, soak_chat.kv_bytes_per_token(model)), records


def soak_in_a_fresh_process(tmp_path, *flags) -> tuple[dict, list[dict]]:
    """`benchmarks/soak_chat.py` as a user runs it, in its own process (one torch thread, CPU clock)."""
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--max-new-tokens", str(MAX_NEW_TOKENS), *flags, "--json", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RSS: " in result.stdout and "generate() alone" in result.stdout
    report = json.loads(out.read_text())
    return report["figures"], report["records"]


def assert_flat(figures: dict, residual: bool = False) -> None:
    assert figures["rss_slope_mb_per_turn"] < RSS_SLOPE_LIMIT_MB, figures
    assert figures["generate_growth"] < GENERATE_GROWTH_LIMIT, figures
    assert figures["turn_growth"] < 1.5 * max(figures["context_growth"], 1.0), figures
    if residual:
        drift = abs(figures["residual_trend_us_per_turn"]) * 1e-6 * (figures["turns"] - figures["fit_from"])
        assert drift < figures["median_turn_s"], figures


def test_short_session_memory_and_time_stay_flat(tiny):
    figures, records = soak(tiny, turns=40, fit_from=10)
    assert records[-1]["context_tokens"] > 3 * records[10]["context_tokens"] > 0  # the conversation really grew
    assert_flat(figures)


def test_full_context_stays_flat(tiny):
    """At the context limit every turn forgets the oldest one: the conversation, the memory and the time stay put."""
    figures, records = soak(tiny, turns=60, fit_from=10, max_context=256, on_context_full="drop_oldest")
    dropping = [record for record in records if record["dropped_turns"]]
    assert dropping and dropping[0]["turn"] < 10  # full before the fitted turns
    assert all(record["context_tokens"] < 256 for record in records)
    assert_flat(figures)


def test_injected_leak_is_measured(tiny):
    """The RSS measurement can fail: 100 KB kept per turn shows as about that slope, above the limit."""
    kept = []

    def leak(turn):
        kept.append(torch.ones(25_600))  # 100 KB

    figures, _ = soak(tiny, turns=20, fit_from=5, on_turn=leak)
    assert figures["rss_slope_mb_per_turn"] > max(RSS_SLOPE_LIMIT_MB, 0.08), figures


@pytest.mark.slow
@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_long_session_memory_and_time_stay_flat(tmp_path, cache_implementation):
    figures, records = soak_in_a_fresh_process(tmp_path, "--turns", "200", "--fit-from", "50", "--cache",
                                               cache_implementation)
    assert records[-1]["context_tokens"] > 3 * records[50]["context_tokens"]
    assert_flat(figures, residual=True)
