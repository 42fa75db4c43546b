"""bf16 and torchao int8 weight-only inference: which layers are quantized, int8 numerics against a per-channel
reference written here, greedy-token agreement and logit differences against fp32, ChatSession's cache reuse in bf16
and int8, loading / saving through transformers' TorchAoConfig, and the errors a user can cause."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llava_config
from PIL import Image
from test_data import make_processor

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, quantization
from llava_ext.chat import ChatSession, compile_memory_shortfall, load_model_and_processor
from llava_ext.quantization import int8_linear_names, int8_weight_only_config, quantize_int8_weight_only

pytest.importorskip("torchao")

# Per layer of the tiny Llama: q, k, v, o, gate, up, down; two layers; and lm_head.
LANGUAGE_LINEARS = [
    f"model.language_model.layers.{layer}.{name}" for layer in range(2)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
] + ["lm_head"]
PROMPTS = [
    ("What is it?", (200, 30, 30)), ("Why is the sky blue?", (20, 60, 220)), ("Count to ten.", None),
    ("Describe the colours, please.", (240, 240, 240)), ("hello there", None), ("Is it a cat?", (10, 10, 10)),
]
MAX_NEW_TOKENS = 10
BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "bench_inference.py"


@pytest.fixture(scope="module")
def fp32_model():
    """The shared tiny config with its default initialization: greedy answers differ from prompt to prompt (checked
    below), and logits are far enough apart that fp32 decides them; no weight scaling is needed."""
    torch.manual_seed(0)
    return LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def lowered(fp32_model):
    """The fp32 model in bf16, and in bf16 with int8 weight-only language model linears."""
    bf16 = copy.deepcopy(fp32_model).to(torch.bfloat16)
    return {"bfloat16": bf16, "int8": quantize_int8_weight_only(copy.deepcopy(bf16))}


def prompt_inputs(processor, question: str, color, dtype: torch.dtype) -> dict:
    images = [Image.new("RGB", (40, 40), color)] if color else []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def test_int8_quantizes_the_language_model_linears_only(fp32_model):
    model = quantize_int8_weight_only(copy.deepcopy(fp32_model))
    assert int8_linear_names(model) == LANGUAGE_LINEARS
    for name, parameter in model.named_parameters():
        if name.startswith(("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens")):
            assert type(parameter.data) is torch.Tensor, name  # left as it was, values included
            assert torch.equal(parameter, fp32_model.get_parameter(name)), name
    without_head = quantize_int8_weight_only(copy.deepcopy(fp32_model), include_lm_head=False)
    assert int8_linear_names(without_head) == LANGUAGE_LINEARS[:-1]


def test_int8_linear_matches_a_per_channel_reference():
    """Symmetric per-output-channel int8: scale = max|w| / 127.5 per row (torchao's symmetric mapping over
    [-128, 127]), weights rounded to the nearest step; the layer computes x @ (q * scale).T + b."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(48, 24))
    weight, bias = layer[0].weight.detach().clone(), layer[0].bias.detach().clone()
    x = torch.randn(5, 48)
    quantize_int8_weight_only(layer)
    quantized = layer[0].weight
    scale = weight.abs().amax(dim=1, keepdim=True) / 127.5  # (out, 1)
    torch.testing.assert_close(quantized.scale.reshape(24, 1), scale)
    assert quantized.qdata.dtype == torch.int8
    assert ((quantized.qdata.float() - weight / scale).abs() <= 0.5 + 1e-4).all()  # nearest step
    output = layer(x)
    torch.testing.assert_close(output, x @ (quantized.qdata.float() * scale).T + bias, rtol=1e-5, atol=1e-5)
    # and within half a step of every weight of the fp32 layer's output
    bound = x.abs() @ (scale.expand_as(weight) / 2).T + 1e-5  # (5, 24)
    assert ((output - (x @ weight.T + bias)).abs() <= bound).all()


GREEDY = {"max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": MAX_NEW_TOKENS, "do_sample": False}


@pytest.fixture(scope="module")
def fp32_outputs(fp32_model, processor):
    """Per prompt: fp32's greedy tokens (new,) and its prompt's logits (1, seq, vocab)."""
    outputs = []
    for question, color in PROMPTS:
        inputs = prompt_inputs(processor, question, color, torch.float32)
        with torch.no_grad():
            tokens = fp32_model.generate(**inputs, **GREEDY)[0, inputs["input_ids"].shape[1] :]
            outputs.append((tokens, fp32_model(**inputs).logits))
    return outputs


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_greedy_tokens_agree_with_fp32(lowered, fp32_outputs, processor, precision, record_property):
    """>= 90% of greedy tokens equal fp32's over several prompts, and the logits stay close (measured: 100% of tokens;
    max difference about 0.003 for bf16 and 0.004 for int8, with logits' standard deviation about 0.12)."""
    model = lowered[precision]
    agree, total, max_diff = 0, 0, 0.0
    for (question, color), (expected, reference_logits) in zip(PROMPTS, fp32_outputs):
        inputs = prompt_inputs(processor, question, color, torch.bfloat16)
        with torch.no_grad():
            tokens = model.generate(**inputs, **GREEDY)[0, inputs["input_ids"].shape[1] :]
            logits = model(**inputs).logits.float()
        agree += int((tokens == expected).sum())
        total += expected.numel()
        max_diff = max(max_diff, float((logits - reference_logits).abs().max()))
    record_property("token_agreement", agree / total)
    record_property("max_logit_difference", max_diff)
    # fp32's answers are not degenerate: each prompt gets its own
    assert len({tuple(tokens.tolist()) for tokens, _ in fp32_outputs}) == len(PROMPTS)
    assert agree / total >= 0.9
    smallest_std = min(float(logits.std()) for _, logits in fp32_outputs)
    assert 0 < max_diff < 0.15 * smallest_std  # lowered precision changes the logits, by a small fraction


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_chat_session_equals_plain_generate(lowered, processor, precision, cache_implementation):
    """The cache-reuse invariant in bf16 and int8: each answer equals a fresh generate() over the whole conversation
    with the same model (static cache uncompiled here; compiled in the slow test below)."""
    model = lowered[precision]
    session = ChatSession(model, processor, cache_implementation=cache_implementation, compile=False)
    images = [Image.new("RGB", (40, 40), (200, 30, 30))]
    questions = ["What is it?", "Why is it red?", "And then?"]
    for turn, question in enumerate(questions):
        answer = session.ask(question, images=images if turn == 0 else None, max_new_tokens=MAX_NEW_TOKENS)
        messages = session.messages[:-1]  # the conversation up to this question
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=images, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        sequences = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected = processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == expected.strip()


@pytest.fixture(scope="module")
def decisive(fp32_model):
    """The tiny model made decisive (the benchmark's `make_confident`: each token predicts a fixed random successor,
    top-1 minus top-2 logit about 2.8), in bf16 and int8: the default init's answers have exact bf16 ties, which any
    other kernel breaks either way, so equal answers there say nothing about a compiled step."""
    spec = importlib.util.spec_from_file_location("bench_inference", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = copy.deepcopy(fp32_model)
    bench.make_confident(model)
    bf16 = model.to(torch.bfloat16)
    return {"bfloat16": bf16, "int8": quantize_int8_weight_only(copy.deepcopy(bf16))}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_compiled_chat_session_equals_uncompiled(decisive, processor, precision):
    """ChatSession's compiled path (frozen weights, inductor's C++ GEMM / int8 weight-only templates, the bf16 vision
    tower compiled) answers as the eager forward does."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = decisive[precision]
    images = [Image.new("RGB", (40, 40), (200, 30, 30))]
    fast = ChatSession(model, processor)
    plain = ChatSession(model, processor, cache_implementation="dynamic")
    assert fast.compile
    assert fast.ask("What is it?", images=images, max_new_tokens=MAX_NEW_TOKENS) == plain.ask(
        "What is it?", images=images, max_new_tokens=MAX_NEW_TOKENS
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        answer = fast.ask("Why is it red?", max_new_tokens=MAX_NEW_TOKENS)
    assert answer == plain.ask("Why is it red?", max_new_tokens=MAX_NEW_TOKENS)
    # the fused attention kernel runs in the (eager) prefill's 2 layers only; the compiled decode steps do without it
    fused = [event for event in profile.key_averages() if "flash_attention" in event.key]
    assert sum(event.count for event in fused) == 2
    # every linear (int8 too) ran on inductor's C++ GEMM template, none on a timed-and-cached ATen choice
    linears = sum(isinstance(module, torch.nn.Linear) for module in model.model.language_model.modules()) + 1
    assert counters["inductor"]["cpp_templated_kernel_counter"] == linears  # + 1: lm_head


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_a_second_model_of_the_same_shapes_decodes_with_its_own_weights(decisive, processor, precision):
    """Frozen weights are constants of the compiled step, so no compiled step may be reused for another model: the
    on-disk graph caches keyed torchao int8 weights by shape, and the second int8 model (same shapes, other weights)
    answered with the first one's tokens, in this process and in any later one."""
    first = decisive[precision]
    second = copy.deepcopy(decisive["bfloat16"])
    with torch.no_grad():  # another decisive model: every token gets another successor
        second.lm_head.weight.copy_(second.lm_head.weight.roll(1, dims=0))
    if precision == "int8":
        second = quantize_int8_weight_only(second)
    question = {"max_new_tokens": 4, "min_new_tokens": 4}
    answers = []
    for model in (first, second):
        torch._dynamo.reset()  # a fresh compile, as in a new process: only the on-disk caches connect the two
        expected = ChatSession(model, processor, cache_implementation="dynamic").ask("What is it?", **question)
        assert ChatSession(model, processor).ask("What is it?", **question) == expected
        answers.append(expected)
    assert answers[0] != answers[1]


def test_compile_memory_counts_int8_bytes(lowered, monkeypatch):
    """The compiled step's memory estimate counts what int8 weights hold (int8 data, scales, zero points), not bf16
    sizes."""
    import psutil

    class NoMemory:
        available = 0

    monkeypatch.setattr(psutil, "virtual_memory", lambda: NoMemory())
    model = lowered["int8"]
    stored = 0
    for parameter in model.parameters():
        if type(parameter.data) is torch.Tensor:
            stored += parameter.nbytes
        else:  # int8 data (out, in), per-row scales and zero points (out, 1)
            stored += sum(getattr(parameter, name).nbytes for name in ("qdata", "scale", "zero_point"))
    assert compile_memory_shortfall(model) == 2 * stored
    assert compile_memory_shortfall(lowered["bfloat16"]) == 2 * sum(p.nbytes for p in lowered["bfloat16"].parameters())
    assert 2 * stored < compile_memory_shortfall(lowered["bfloat16"])


@pytest.fixture(scope="module")
def checkpoint(fp32_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantization") / "fp32"
    fp32_model.save_pretrained(path)
    make_processor().save_pretrained(path)
    return path


def test_load_int8_then_save_and_load_back(checkpoint, lowered, processor, tmp_path):
    """`quantize="int8"` quantizes while loading (TorchAoConfig), as `quantize_int8_weight_only` does after loading
    (from the fp32 weights rather than their bf16 rounding: logits within a few bf16 steps); the result saves to
    safetensors and loads back quantized, without being told to, to the same logits."""
    model, _ = load_model_and_processor(str(checkpoint), device="cpu", dtype="bfloat16", quantize="int8")
    assert int8_linear_names(model) == LANGUAGE_LINEARS
    assert model.model.vision_tower.dtype == model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    inputs = prompt_inputs(processor, "What is it?", (200, 30, 30), torch.bfloat16)
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, lowered["int8"](**inputs).logits, rtol=0, atol=5e-3)
    model.save_pretrained(tmp_path / "int8")
    processor.save_pretrained(tmp_path / "int8")
    saved = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "torchao"
    for quantize in (None, "int8"):
        again, _ = load_model_and_processor(str(tmp_path / "int8"), device="cpu", quantize=quantize)
        assert int8_linear_names(again) == LANGUAGE_LINEARS
        with torch.no_grad():
            torch.testing.assert_close(again(**inputs).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_int8_auto_dtype_follows_the_cpu(checkpoint, monkeypatch, native_bf16, expected):
    monkeypatch.setattr(quantization, "cpu_has_native_bf16", lambda: native_bf16)
    model, _ = load_model_and_processor(str(checkpoint), device="cpu", quantize="int8")
    assert model.model.vision_tower.dtype == model.lm_head.weight.dtype == expected


def test_int8_config_leaves_lm_head_when_asked():
    config = int8_weight_only_config(include_lm_head=False)
    assert config.modules_to_not_convert == [*quantization.INT8_SKIP_MODULES, "lm_head"]
    assert config.quant_type.set_inductor_config is False  # no process-wide inductor settings changed


def test_load_errors(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported; use None .* or 'int8'"):
        load_model_and_processor(str(checkpoint), device="cpu", quantize="int4")
    other = tmp_path / "bnb"
    other.mkdir()
    for file in checkpoint.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is already quantized \(bitsandbytes.*leave quantize unset"):
        load_model_and_processor(str(other), device="cpu", quantize="int8")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "torchao" else real_find_spec(name, *args)
    )
    with pytest.raises(ImportError, match=r"quantize='int8' needs torchao.*pip install 'llava-ext\[quant\]'"):
        load_model_and_processor(str(checkpoint), device="cpu", quantize="int8")
    with pytest.raises(ImportError, match=r"pip install torchao"):
        quantize_int8_weight_only(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_quantize_errors(lowered):
    with pytest.raises(ValueError, match=r"already has 15 int8 linear layers .*quantize a model once"):
        quantize_int8_weight_only(lowered["int8"])
    with pytest.raises(ValueError, match=r"Sequential has no floating-point nn.Linear layer outside .*nothing to"):
        quantize_int8_weight_only(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4)))
    vision_only = torch.nn.Module()
    vision_only.vision_tower = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"outside \['model.vision_tower'"):
        quantize_int8_weight_only(vision_only)


def test_evaluate_checkpoint_scores_the_int8_model(checkpoint, tmp_path, monkeypatch):
    """`evaluate_checkpoint(..., quantize="int8")` answers with the int8 model (the demo's accuracy check uses it)."""
    import llava_ext.evaluate as evaluate

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "red.png", "question": "Color?", "answers": ["red"]}))
    seen = {}

    def answers(model, processor, records, *args):
        seen["model"] = model
        return ["red"] * len(records)

    monkeypatch.setattr(evaluate, "generate_answers", answers)
    result = evaluate.evaluate_checkpoint(checkpoint, tmp_path / "data.jsonl", device="cpu", quantize="int8")
    assert result.exact_match.correct == 1
    assert int8_linear_names(seen["model"]) == LANGUAGE_LINEARS


def test_decode_compile_config_lowers_16_bit_attention_to_math_on_cpu():
    """bf16 / int8 models (16-bit activations) decode with attention lowered to matmul-softmax-matmul on CPU, where
    torch's fused CPU kernel is ~5x slower for one query; fp32 keeps the fused kernel, CUDA its own default."""
    from llava_ext import chat

    cpu = torch.device("cpu")
    assert chat.decode_compile_config(cpu, torch.bfloat16).backend is chat._inductor_with_math_attention
    assert chat.decode_compile_config(cpu, torch.bfloat16) == chat.decode_compile_config(cpu, torch.bfloat16)
    assert chat.decode_compile_config(cpu, torch.float32).backend == "inductor"
    with pytest.raises(TypeError):  # the fp32 settings compiled a wrong int8 decode step: the dtype must be given
        chat.decode_compile_config(cpu)
    assert chat.decode_compile_config(torch.device("cuda"), torch.bfloat16).backend == "inductor"
