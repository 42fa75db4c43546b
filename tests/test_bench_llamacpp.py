"""benchmarks/bench_llamacpp.py's pure helpers (the runs themselves need llama.cpp: see tests/test_llamacpp.py)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_llamacpp.py"
sys.path.insert(0, str(BENCH.parent))
SPEC = importlib.util.spec_from_file_location("bench_llamacpp", BENCH)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

# two runs of llama-bench 0.3.36 -o json (fields trimmed to those read and a few beside them)
PREFILL_JSON = json.dumps([{"build_commit": "unknown", "model_type": "llama 1B F32", "n_threads": 2, "n_prompt": 617,
                            "n_gen": 0, "n_depth": 0, "avg_ns": 3085000000, "avg_ts": 200.0, "stddev_ts": 1.5}])
DECODE_JSON = json.dumps([{"build_commit": "unknown", "model_type": "llama 1B F32", "n_threads": 2, "n_prompt": 0,
                           "n_gen": 128, "n_depth": 617, "avg_ns": 2560000000, "avg_ts": 50.0, "stddev_ts": 0.4}])


def test_parse_llama_bench():
    assert bench.parse_llama_bench(PREFILL_JSON) == {"prefill_tok_s": 200.0}
    assert bench.parse_llama_bench(DECODE_JSON) == {"decode_tok_s": 50.0, "decode_depth": 617}


def test_format_table_shows_ratios_ours_over_llama_cpp():
    sides = {"decode_tok_s": (60.0, 50.0), "prefill_s": (1.5, 3.0), "image_encode_s": (0.5, 0.25),
             "peak_rss_mb": (900.0, 600.0)}
    row = {"gguf": "q8_0", "ours": {key: ours for key, (ours, _) in sides.items()},
           "llama_cpp": {key: theirs for key, (_, theirs) in sides.items()}}
    report = {"sizes": [{"size": "small", "parameters_m": 256.4, "prompt_tokens": 617, "new_tokens": 128,
                         "rows": {"int8": row}}]}
    lines = bench.format_table(report).splitlines()
    assert "size small (256M parameters, prompt 617 tokens, 128 decoded)" in lines
    decode = next(line for line in lines if "int8 vs q8_0, decode tok/s" in line)
    assert decode.split()[-3:] == ["60", "50", "1.200"]
    assert next(line for line in lines if "prefill s" in line).split()[-1] == "0.500"
    assert next(line for line in lines if "peak RSS MB" in line).split()[-1] == "1.500"


def test_precision_list_names_the_choices():
    assert bench.precision_list("bf16, int8") == ["bf16", "int8"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"fp16 is not a precision; choose from fp32,bf16,int8,int4"):
        bench.precision_list("fp16")


def test_1b_size_is_tinyllama_shaped():
    _, text, *_ = bench.bench_inference.SIZES["1b"]
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]) == (2048, 5632, 22)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (32, 4)
