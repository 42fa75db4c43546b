"""Smoke run of benchmarks/bench_inference.py at the tiny size: it runs end to end and writes every figure."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_inference.py"
SPEC = importlib.util.spec_from_file_location("bench_inference", BENCH)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

RATIOS = ("vision_ratio", "prefill_ratio", "decode_speedup", "multiturn_ttft_speedup", "rss_ratio", "load_ratio",
          "fp32_floor_fraction")
PER_MODEL = ("vision_s", "prefill_s", "decode_default_tok_s", "decode_chat_path_tok_s", "batch8_tok_s",
             "multiturn_ttft_s", "load_s", "peak_rss_mb", "compile_warmup_s")
# issue 14's figures, each against the reference's fp32 default path, and the rows behind them
PRECISION_FIGURES = {
    "bf16": ("bf16_prefill_ratio", "bf16_decode_speedup", "bf16_floor_fraction", "bf16_prefill_same_settings_ratio",
             "bf16_default_same_settings_speedup", "bf16_decode_chat_path_tok_s", "bf16_max_logit_diff"),
    "int8": ("int8_decode_speedup", "int8_floor_fraction", "int8_prefill_ratio", "int8_prefill_s",
             "int8_decode_chat_path_tok_s", "int8_max_logit_diff"),
    "int4": ("int4_decode_speedup", "int4_floor_fraction", "int4_prefill_ratio", "int4_prefill_s",
             "int4_decode_chat_path_tok_s", "int4_max_logit_diff"),
}
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow  # about 100 s: the benchmark compiles decode steps for four precisions
@pytest.mark.release
def test_tiny_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    precisions = "fp32,bf16,int8,int4" if HAS_TORCHAO else "fp32,bf16"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size", "tiny", "--repeats", "1", "--load-repeats", "1",
         "--precisions", precisions, "--bandwidth-mib", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in RATIOS:
        assert positive(report[key]), key
    for key in PER_MODEL:
        for name in ("reference", "ours"):
            value = report[key][name]
            assert math.isfinite(value) and (value > 0 or key == "compile_warmup_s"), (key, name)
    assert report["greedy_tokens_equal"] is True
    assert report["environment"]["torch"] and report["environment"]["transformers"]
    assert "decode_speedup" in result.stdout and "compile warm-up" in result.stdout

    assert positive(report["memory_bandwidth_gb_s"])
    assert f"memory bandwidth: {report['memory_bandwidth_gb_s']:.1f} GB/s" in result.stdout
    ran = [precision for precision in ("bf16", "int8", "int4") if precision in report["floor_tok_s"]]
    assert set(ran) | set(report["skipped_precisions"]) == set(precisions.split(",")) - {"fp32"}
    for precision in ran:
        for key in PRECISION_FIGURES[precision]:
            assert positive(report[key]), key
        for key in ("token_agreement", "teacher_forced_agreement"):
            assert 0.0 <= report[f"{precision}_{key}"] <= 1.0, (precision, key)
        # No logit moved by half of fp32's smallest top-1 margin, so no greedy token may differ: neither fed fp32's
        # answer (eager) nor on ChatSession's compiled path, which the free-running agreement checks.
        if report[f"{precision}_max_logit_diff"] < report["fp32_logit_margin"]["min"] / 2:
            assert report[f"{precision}_teacher_forced_agreement"] == 1.0, precision
            assert report[f"{precision}_token_agreement"] == 1.0, precision
        # fewer bytes per token than fp32, so a higher floor
        assert report["decode_bytes_per_token"][precision] < report["decode_bytes_per_token"]["fp32"]
        assert report["floor_tok_s"][precision] > report["floor_tok_s"]["fp32"]
    for precision, reason in report["skipped_precisions"].items():
        assert f"{precision}: skipped, {reason}" in result.stdout
        assert not any(key in report for key in PRECISION_FIGURES[precision])
    if "bf16" in ran:  # the figure renamed by issue 14 now means ours bf16 chat path vs reference fp32 default
        assert report["bf16_decode_speedup"] == pytest.approx(
            report["bf16_decode_chat_path_tok_s"] / report["decode_default_tok_s"]["reference"])
        assert report["bf16_prefill_ratio"] == pytest.approx(
            report["bf16_prefill_s"]["ours"] / report["prefill_s"]["reference"])
    if ran:  # the confident random model (make_confident): no exact ties in fp32's answer
        assert report["fp32_logit_margin"]["min"] > 0


def tiny_language_model_numbers(config) -> tuple[int, int, int]:
    """(linear weight elements, linear output rows, other parameter elements) read per token, from the config."""
    text = config.text_config
    hidden, inter, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    kv = text.num_key_value_heads * (hidden // text.num_attention_heads)
    linear = layers * (hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter) + vocab * hidden  # with lm_head
    rows = layers * (hidden * 2 + kv * 2 + inter * 2 + hidden) + vocab
    other = layers * 2 * hidden + hidden + hidden  # 2 norms a layer, the final norm, one embedding row
    return linear, rows, other


def test_decode_bytes_count_the_language_model_and_one_embedding_row():
    reference, ours = bench.build_models("tiny", torch.float32, "cpu")
    linear, _, other = tiny_language_model_numbers(ours.config)
    assert bench.decode_bytes_per_token(ours) == 4 * (linear + other)
    assert bench.decode_bytes_per_token(ours.to(torch.bfloat16)) == 2 * (linear + other)


def test_decode_bytes_of_int8_weights_are_one_byte_a_weight_plus_scales():
    pytest.importorskip("torchao")
    from llava_ext.quantization import quantize_int8_weight_only

    _, ours = bench.build_models("tiny", torch.float32, "cpu")
    linear, rows, other = tiny_language_model_numbers(ours.config)
    quantize_int8_weight_only(ours.to(torch.bfloat16))
    scale_bytes = ours.lm_head.weight.scale.element_size()
    assert bench.decode_bytes_per_token(ours) == linear + rows * scale_bytes + 2 * other


def test_confident_model_is_the_same_for_both_and_not_flat():
    reference, ours = bench.build_models("tiny", torch.float32, "cpu")
    ours_weights = ours.state_dict()
    for name, weight in reference.state_dict().items():
        assert torch.equal(weight, ours_weights[name]), name
    embeddings = ours.get_input_embeddings().weight
    assert embeddings.std().item() == pytest.approx(bench.CONFIDENT_EMBEDDING_STD, rel=1e-3)
    # lm_head's rows are unit vectors, but the one that is the pad token's (zero) embedding
    norms = ours.get_output_embeddings().weight.norm(dim=1)
    assert int((norms - 1).abs().lt(1e-5).sum()) == norms.numel() - 1 and int(norms.lt(1e-5).sum()) == 1


def test_decode_bytes_of_int4_weights_are_half_a_byte_a_weight_plus_group_scales():
    """int4 linears: half a byte a weight and a bf16 scale and zero point per 32 weights; lm_head int8 (a byte a weight,
    an fp32 scale per row); the rest bf16. The benchmark's tiny model has 32-row attention projections, which int4
    leaves in bf16 (out_features must be a multiple of 64), so this counts a model with 64-wide layers."""
    pytest.importorskip("torchao")
    from llava_ext.quantization import int4_linear_names, quantize_int4_weight_only

    config = bench.build_config("tiny")
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_key_value_heads, text.head_dim = 64, 128, 4, 16
    ours = bench.LlavaExtForConditionalGeneration(bench.LlavaExtConfig(**config.to_dict())).eval()
    linear, rows, other = tiny_language_model_numbers(ours.config)
    vocab, hidden = text.vocab_size, text.hidden_size
    quantize_int4_weight_only(ours.to(torch.bfloat16))
    assert len(int4_linear_names(ours)) == 7 * text.num_hidden_layers  # every linear but lm_head
    int4 = linear - vocab * hidden
    assert bench.decode_bytes_per_token(ours) == int4 // 2 + int4 // 32 * 4 + vocab * hidden + vocab * 4 + 2 * other


def test_precisions_flag_and_skips(monkeypatch):
    assert bench.precision_list("int8,bf16") == ["fp32", "bf16", "int8"]
    assert bench.precision_list("int4,int8") == ["fp32", "int8", "int4"]
    assert bench.precision_list("fp32") == ["fp32"]
    with pytest.raises(Exception, match="fp16 is not a precision; choose from fp32,bf16,int8,int4"):
        bench.precision_list("fp32,fp16")
    assert set(bench.precision_skips(["fp32", "bf16", "int8", "int4"], "cuda", torch.float32)) == {
        "bf16", "int8", "int4"}
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name, *args: None if name == "torchao" else find_spec(name, *args)
    )
    skips = bench.precision_skips(["fp32", "bf16", "int8", "int4"], "cpu", torch.float32)
    no_bf16 = "this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 is slower than fp32"
    assert skips == {"bf16": no_bf16, "int8": "torchao is not installed (pip install torchao)", "int4": no_bf16}
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: True)
    assert bench.precision_skips(["fp32", "int4"], "cpu", torch.float32) == {
        "int4": "torchao is not installed (pip install torchao)"}
