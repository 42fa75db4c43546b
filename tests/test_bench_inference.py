"""Smoke run of benchmarks/bench_inference.py at the tiny size: it runs end to end and writes every figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_inference.py"
RATIOS = ("vision_ratio", "prefill_ratio", "decode_speedup", "multiturn_ttft_speedup", "rss_ratio", "load_ratio")
PER_MODEL = ("vision_s", "prefill_s", "decode_default_tok_s", "decode_chat_path_tok_s", "batch8_tok_s",
             "multiturn_ttft_s", "load_s", "peak_rss_mb", "compile_warmup_s")


def test_tiny_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size", "tiny", "--repeats", "1", "--load-repeats", "1", "--no-bf16",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in RATIOS:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    for key in PER_MODEL:
        for name in ("reference", "ours"):
            value = report[key][name]
            assert math.isfinite(value) and (value > 0 or key == "compile_warmup_s"), (key, name)
    assert report["greedy_tokens_equal"] is True
    assert report["environment"]["torch"] and report["environment"]["transformers"]
    assert "decode_speedup" in result.stdout and "compile warm-up" in result.stdout
