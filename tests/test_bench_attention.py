"""Smoke run of benchmarks/bench_attention.py on CPU: sdpa and eager attention agree on one tiny model."""

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import HANG_GUARD_S

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_attention.py"


def test_tiny_attention_benchmark_compares_implementations(tmp_path):
    out = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size", "tiny", "--device", "cpu", "--dtype", "float32",
         "--implementations", "sdpa,eager", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["implementations"]
    assert list(rows) == ["sdpa", "eager"]
    # close in fp32; not zero, which shows the implementation really was switched between runs
    assert 0.0 < rows["eager"]["max_abs_logits_diff"] < 1e-4
    assert rows["eager"]["greedy_tokens_equal"] is True
    for row in rows.values():
        assert math.isfinite(row["prefill_s"]) and row["prefill_s"] > 0 and row["decode_tok_s"] > 0
    assert "max|logits - sdpa|" in result.stdout
