"""Side-by-side inference benchmark: transformers' `LlavaForConditionalGeneration` vs `LlavaExtForConditionalGeneration`.

Both models come from one random config with the same weights and run in one process, alternating, `--repeats`
times; the table shows medians and ratios (time ratios ours/reference: below 1 is faster; speedups
reference/ours: above 1 is faster). Load time and peak RSS are measured in one fresh subprocess per model and repeat,
`--load-repeats` times: a ~0.1 s load in a new process varies by tens of percent from run to run.

    python benchmarks/bench_inference.py                      # "small": ~256M parameters, fp32, CPU
    python benchmarks/bench_inference.py --size tiny --json out.json   # CI smoke run
    python benchmarks/bench_inference.py --precisions fp32,bf16       # no int8/int4 rows (e.g. without torchao)
    python benchmarks/bench_inference.py --size 7b-shapes --device cuda --dtype float16

"decode (chat path)" is what `ChatSession` / `llava-ext chat` run by default: a `StaticCache` and a compiled decode
step (`llava_ext.chat.decode_compile_config` under `decode_compile_settings`: on CPU, frozen weights and inductor's
C++ GEMM kernels); its compile warm-up is reported on its own line.
Our prefill is also timed as ChatSession runs it: a bf16/fp16 vision tower on CPU compiled
(`llava_ext.chat.compiled_vision_tower`); an fp32 one, and the reference's, eager.

Precisions (CPU fp32 runs, `--precisions fp32,bf16,int8,int4`): the same weights cast to bf16, int8 weight-only
(`llava_ext.quantization.quantize_int8_weight_only`, the rest of the model in `int8_default_dtype`: bf16 on a CPU with
native bf16) and int4 weight-only (`quantize_int4_weight_only`, its defaults: groups of 32, lm_head int8; bf16),
decoded on ChatSession's path and compared with the reference's fp32 default path, with the
weight-reading floor (bytes of weights read per decoded token / the memory bandwidth measured here with a large copy)
and the greedy-token agreement with fp32. A precision the machine cannot run (no torchao, no native bf16) is skipped
with a line saying why.
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, StaticCache

import llava_ext
from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.chat import (
    CACHE_BLOCK, compiled_vision_tower, decode_compile_config, decode_compile_settings, new_static_cache,
    truncate_cache,
)
from llava_ext.compat import CACHE_KWARG, BaseStreamer
from llava_ext.quantization import (
    cpu_has_native_bf16, int8_default_dtype, quantize_int4_weight_only, quantize_int8_weight_only, stored_bytes,
)

SIZES = {
    # name: (vision tower, language model, text tokens, new tokens, batch-8 new tokens)
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=192),
        12, 8, 4,
    ),
    "small": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=336,
             patch_size=14),
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32064),
        40, 128, 32,
    ),
    "7b-shapes": (  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
             patch_size=14),
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             vocab_size=32064),
        40, 128, 32,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("fp32", "bf16", "int8", "int4")
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # --dtype -> a precision row's label
VISION_PARTS = ("model.vision_tower.", "model.multi_modal_projector.")  # run in the prefill only, not per token
CONFIDENT_EMBEDDING_STD = 0.2  # see `make_confident`; transformers' init gives 0.02


def build_config(size: str) -> LlavaConfig:
    vision, text, *_ = SIZES[size]
    vocab = text["vocab_size"]
    image_token = vocab - 64 if vocab > 1000 else vocab - 8  # 32000 for the 32064-token vocabularies
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(projection_dim=vision["hidden_size"], **vision),
        text_config=LlamaConfig(max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, **text),
        image_token_index=image_token,
        image_seq_length=num_patches,
    )
    config._attn_implementation = "sdpa"
    return config


def build_models(size: str, dtype: torch.dtype, device: str):
    """transformers' LLaVA and ours, same random weights."""
    torch.manual_seed(0)
    config = build_config(size)
    reference = LlavaForConditionalGeneration(config)
    make_confident(reference)
    reference = reference.to(dtype=dtype, device=device).eval()
    ours = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict()))
    ours.load_state_dict(reference.state_dict())
    return reference, ours.to(dtype=dtype, device=device).eval()


@torch.no_grad()
def make_confident(model) -> None:
    """Give the random language model a trained model's confidence, in place (before ours copies the weights).

    At transformers' init (std 0.02) the layers' outputs drown the current token's embedding, so the greedy decode
    repeats one token whatever the precision and a token agreement would mean nothing. Here the input embeddings get
    std `CONFIDENT_EMBEDDING_STD`, so the current token shows through the random layers, and lm_head's row j is the
    unit-length embedding of token `successor[j]` (a fixed random permutation): the model predicts a random successor
    of the current token, moved by the context. At the small size the fp32 greedy decode then gives a new token at
    every step, with a top-1 minus top-2 logit margin of about 2 (median) and now and then a near tie, where a lower
    precision may pick the other token, as with a trained chat model's answers. The margins are reported
    (`fp32_logit_margin`). Speed does not depend on the values.
    """
    embeddings = model.get_input_embeddings().weight  # (vocab, hidden); the pad row stays zero
    embeddings.mul_(CONFIDENT_EMBEDDING_STD / embeddings.std())
    successor = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(3))
    rows = embeddings[successor]  # (vocab, hidden)
    model.get_output_embeddings().weight.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6))


# torchao's symmetric int8 weights keep an all-zero `zero_point` that the weight-only matmul never reads
UNREAD = ("zero_point",)


def decode_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step reads: what the weight-reading floor divides the bandwidth by.

    Counted: every parameter of the language model and lm_head, read whole each token (int8 weights with their
    scales, int4 weights with their groups' scales and zero points), except the input embeddings, of which one row is
    gathered. Not counted: the vision tower and projector (prefill only), the KV cache (it grows with the context: the
    floor is for weights alone) and the activations.
    """
    embeddings = model.get_input_embeddings().weight
    total = 0
    for name, parameter in model.named_parameters():  # tied parameters are listed once
        if name.startswith(VISION_PARTS):
            continue
        if parameter is embeddings:
            total += stored_bytes(parameter, UNREAD) // parameter.shape[0]  # one (hidden,) row per token
        else:
            total += stored_bytes(parameter, UNREAD)
    return total


def memory_bandwidth(device: str, mib: int, repeats: int = 5) -> float:
    """GB/s of a `mib` MiB tensor copy, best of `repeats`: (bytes read + bytes written) / time, STREAM's "copy" count
    (a CPU's write-allocate reads are not counted). Uses torch's threads, as the decode does."""
    source = torch.ones(mib * 2**20 // 4, device=device)  # float32; filled so its pages exist before timing
    target = torch.zeros_like(source)
    best = min(timed(lambda: target.copy_(source), device)[0] for _ in range(repeats))
    return 2 * source.nbytes / best / 1e9


def precision_skips(precisions, device: str, dtype: torch.dtype) -> dict[str, str]:
    """Why each asked-for precision beyond fp32 cannot run here ({} when all can)."""
    skips = {}
    for precision in precisions:
        if precision == "fp32":
            continue
        if device != "cpu" or dtype != torch.float32:
            skips[precision] = "the bf16/int8/int4 rows are measured on CPU fp32 runs (--device cpu --dtype float32)"
        elif precision in ("bf16", "int4") and not cpu_has_native_bf16():  # int4 computes in bf16
            skips[precision] = "this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 is slower than fp32"
        elif precision in ("int8", "int4") and importlib.util.find_spec("torchao") is None:
            skips[precision] = "torchao is not installed (pip install torchao)"
    return skips


def build_inputs(config, size: str, batch: int, device: str, dtype: torch.dtype, extra_text: int = 0):
    """`<s>` + one image's placeholders + random text tokens, and a random image per sample."""
    _, _, num_text, *_ = SIZES[size]
    generator = torch.Generator().manual_seed(1)
    image_tokens = torch.full((batch, config.image_seq_length), config.image_token_index)
    text = torch.randint(5, config.image_token_index, (batch, num_text + extra_text), generator=generator)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image_tokens, text], dim=1)  # (batch, seq)
    size_px = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size_px, size_px, generator=generator)  # (batch, 3, size, size)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def greedy(model, inputs, new_tokens: int, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
    )


class TokenClock(BaseStreamer):
    """A streamer that only notes when each batch of tokens arrives (the first `put` is the prompt)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def put(self, value):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def tokens_per_second(self) -> float:
        """Decode rate after the first new token: (n - 1) / (time of the last token - time of the first)."""
        decoded = self.times[1:]  # the first `put` is the prompt
        return (len(decoded) - 1) / (decoded[-1] - decoded[0])


class Runner:
    """Alternates the models `repeats` times per measurement; keeps every sample.

    "reference" and "ours" are the two models in the run's dtype; `add` puts more beside them (the precision rows:
    "reference_bf16", "ours_bf16", "ours_int8", "ours_int4"), measured interleaved with them where a measurement names
    them.
    """

    def __init__(self, reference, ours, size: str, device: str, dtype: torch.dtype, repeats: int):
        self.models = {"reference": reference, "ours": ours}
        self.size, self.device, self.dtype, self.repeats = size, device, dtype, repeats
        self.config = reference.config
        self.inputs = build_inputs(self.config, size, 1, device, dtype)
        self.model_inputs = {"reference": self.inputs, "ours": self.inputs}
        self.caches = {}

    def add(self, name: str, model) -> None:
        """Another model on the same weights; its images are fed in its own floating dtype."""
        self.models[name] = model
        self.model_inputs[name] = dict(self.inputs, pixel_values=self.inputs["pixel_values"].to(model.dtype))

    def alternate(self, measure, names=("reference", "ours")) -> dict[str, float]:
        """Median of `measure(name, model)` per named model, one warm-up call each, calls interleaved."""
        samples = {name: [] for name in names}
        for name in names:
            measure(name, self.models[name])
        for _ in range(self.repeats):
            for name in names:
                samples[name].append(measure(name, self.models[name]))
        return {name: statistics.median(values) for name, values in samples.items()}

    @torch.no_grad()
    def vision(self):
        pixel_values = self.inputs["pixel_values"]
        return self.alternate(lambda name, model: timed(lambda: model.get_image_features(pixel_values), self.device)[0])

    @torch.no_grad()
    def prefill(self, names=("reference", "ours")):
        """Seconds of a one-image prefill; ours as ChatSession runs it (a 16-bit CPU vision tower compiled, see
        `llava_ext.chat.compiles_vision_tower`; its compile falls in the warm-up call), the reference eager."""

        def measure(name, model):
            ours = not name.startswith("reference")
            tower = compiled_vision_tower(model) if ours else contextlib.nullcontext()
            with self.settings("chat" if ours else "default"), tower:
                return timed(lambda: model(**self.model_inputs[name], logits_to_keep=1), self.device)[0]

        return self.alternate(measure, names)

    def static_cache(self, name: str, length: int):
        """A static cache sized as ChatSession sizes it, reused (reset) across calls so compiled graphs stay valid."""
        if name not in self.caches:
            capacity = -(-length // CACHE_BLOCK) * CACHE_BLOCK
            self.caches[name] = new_static_cache(self.config, capacity, torch.device(self.device))
        truncate_cache(self.caches[name], 0)
        return self.caches[name]

    def decode_kwargs(self, name: str, path: str, new_tokens: int) -> dict:
        if path == "default":
            return {}
        length = self.inputs["input_ids"].shape[1] + new_tokens
        kwargs = {CACHE_KWARG: self.static_cache(name, length)}
        if path == "chat":
            kwargs["compile_config"] = decode_compile_config(torch.device(self.device), self.models[name].dtype)
        else:
            kwargs["disable_compile"] = True
        return kwargs

    def settings(self, path: str):
        """The chat path runs `generate()` under ChatSession's compile settings (CPU: frozen weights)."""
        return decode_compile_settings(torch.device(self.device)) if path == "chat" else contextlib.nullcontext()

    @torch.no_grad()
    def decode(self, path: str, new_tokens: int, names=("reference", "ours")) -> tuple[dict, dict]:
        """Decode tokens/s (`TokenClock.tokens_per_second`: prefill is left out)."""
        outputs = {}

        def measure(name, model):
            clock = TokenClock(self.device)
            kwargs = self.decode_kwargs(name, path, new_tokens)
            with self.settings(path):
                outputs[name] = greedy(model, self.model_inputs[name], new_tokens, streamer=clock, **kwargs)
            return clock.tokens_per_second()

        return self.alternate(measure, names), outputs

    @torch.no_grad()
    def compile_warmup(self, name: str, new_tokens: int) -> float:
        """Seconds the first compiled generate takes beyond a warm one."""
        model, inputs = self.models[name], self.model_inputs[name]
        with self.settings("chat"):
            first, _ = timed(lambda: greedy(model, inputs, 8, **self.decode_kwargs(name, "chat", 8)), self.device)
            warm, _ = timed(lambda: greedy(model, inputs, 8, **self.decode_kwargs(name, "chat", 8)), self.device)
        return first - warm

    @torch.no_grad()
    def teacher_forced_logits(self, name: str, sequences: torch.Tensor) -> torch.Tensor:
        """fp32 logits of model `name` at every position of `sequences` (the prompt and an answer), in one forward."""
        inputs = dict(self.model_inputs[name], input_ids=sequences, attention_mask=torch.ones_like(sequences))
        return self.models[name](**inputs).logits.float()  # (1, seq, vocab)

    @torch.no_grad()
    def batch8(self, new_tokens: int):
        inputs = build_inputs(self.config, self.size, 8, self.device, self.dtype)
        return self.alternate(
            lambda name, model: 8 * new_tokens / timed(lambda: greedy(model, inputs, new_tokens), self.device)[0]
        )

    @torch.no_grad()
    def multiturn(self, first_answer: int = 64, followup: int = 20):
        """Time to first token of a second question about the same image.

        Reference: one `generate()` over the whole conversation (image, question 1, answer 1, question 2).
        Ours: what ChatSession does, `generate()` over the same ids with the cache of turn 1, so only question 2 is
        prefilled.
        """
        turn1 = self.inputs
        ours = self.models["ours"]
        cache = StaticCache(config=self.config, max_cache_len=CACHE_BLOCK * 2)
        answer = greedy(ours, turn1, first_answer, **{CACHE_KWARG: cache}, disable_compile=True)  # (1, prompt + answer)
        cached = int(cache.get_seq_length())
        question = torch.randint(5, self.config.image_token_index, (1, followup), generator=torch.Generator().manual_seed(2))
        conversation = torch.cat([answer, question.to(answer.device)], dim=1)  # (1, whole conversation)
        full = {"input_ids": conversation, "attention_mask": torch.ones_like(conversation),
                "pixel_values": turn1["pixel_values"]}
        tokens = {}

        def measure(name, model):
            if name == "reference":
                seconds, tokens[name] = timed(lambda: greedy(model, full, 1), self.device)
                return seconds
            truncate_cache(cache, cached)
            seconds, tokens[name] = timed(
                lambda: greedy(model, {k: full[k] for k in ("input_ids", "attention_mask")}, 1, **{CACHE_KWARG: cache},
                               disable_compile=True),
                self.device,
            )
            return seconds

        result = self.alternate(measure)
        result["same_token"] = bool(torch.equal(tokens["reference"][:, -1], tokens["ours"][:, -1]))
        return result


CHILD = r"""
import json, resource, sys, time, torch
import llava_ext
from transformers import LlavaForConditionalGeneration
from llava_ext import LlavaExtForConditionalGeneration
sys.path.insert(0, {bench_dir!r})
from bench_inference import build_inputs
cls = {{"reference": LlavaForConditionalGeneration, "ours": LlavaExtForConditionalGeneration}}[{name!r}]
start = time.perf_counter()
model = cls.from_pretrained({path!r}, dtype={dtype}).to({device!r}).eval()
load = time.perf_counter() - start
inputs = build_inputs(model.config, {size!r}, 1, {device!r}, {dtype})
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=8, do_sample=False)
try:  # this process's own high-water mark; ru_maxrss would also count the parent it was forked from
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"load_s": load, "peak_rss_mb": peak}}))
"""


def load_and_rss(reference, ours, size: str, device: str, dtype_name: str, repeats: int) -> dict:
    """Load time and peak RSS (load + one 8-token generate), each model in its own fresh process, alternating."""
    samples = {"reference": [], "ours": []}
    with tempfile.TemporaryDirectory() as directory:
        paths = {name: str(Path(directory) / name) for name in samples}
        reference.save_pretrained(paths["reference"])
        ours.save_pretrained(paths["ours"])
        for _ in range(repeats):
            for name in samples:
                code = CHILD.format(
                    bench_dir=str(Path(__file__).parent), name=name, path=paths[name], size=size, device=device,
                    dtype=f"torch.{dtype_name}",
                )
                output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                samples[name].append(json.loads(output.stdout.strip().splitlines()[-1]))
    return {
        key: {name: statistics.median(sample[key] for sample in samples[name]) for name in samples}
        for key in ("load_s", "peak_rss_mb")
    }


def environment(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llava_ext": llava_ext.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_precision_models(runner: Runner, reference, ours, precisions, device: str) -> dict:
    """Put the bf16, int8 and int4 models beside the fp32 ones, from the same fp32 weights; returns {label: model
    name}."""
    added = {}
    if "int8" in precisions:  # the rest of the model in bf16 where this CPU computes it natively, else fp32
        runner.add("ours_int8", quantize_int8_weight_only(copy.deepcopy(ours).to(int8_default_dtype(device))))
        added["int8"] = "ours_int8"
    if "int4" in precisions:  # bf16 only (skipped where bf16 is emulated)
        runner.add("ours_int4", quantize_int4_weight_only(copy.deepcopy(ours).to(torch.bfloat16)))
        added["int4"] = "ours_int4"
    if "bf16" in precisions:
        runner.add("reference_bf16", copy.deepcopy(reference).to(torch.bfloat16))
        runner.add("ours_bf16", copy.deepcopy(ours).to(torch.bfloat16))
        added["bf16"] = "ours_bf16"
    return added


@torch.no_grad()
def precision_quality(runner: Runner, fp32_sequence: torch.Tensor, answers: dict[str, torch.Tensor],
                      added: dict[str, str]) -> dict:
    """Each precision's greedy answer and logits against our fp32 ones.

    `<label>_token_agreement`: the fraction of answer positions whose greedy token equals fp32's (the answers run
    free, so after a first difference most later tokens differ too). `<label>_teacher_forced_agreement`: the fraction
    of positions where the model, fed fp32's answer, picks fp32's next token (one near tie costs one position).
    `<label>_max_logit_diff`: the largest |logit - fp32 logit| over the prompt and fp32's answer.
    """
    prompt = runner.inputs["input_ids"].shape[1]
    fp32_logits = runner.teacher_forced_logits("ours", fp32_sequence)  # (1, seq, vocab)
    fp32_next = fp32_logits[0, prompt - 1 : -1]  # (new, vocab): the logits that chose each answer token
    top2 = fp32_next.topk(2, dim=-1).values  # (new, 2)
    margin = top2[:, 0] - top2[:, 1]
    quality = {
        "fp32_logit_margin": {"median": margin.median().item(), "min": margin.min().item()},
        "fp32_answer_distinct_tokens": int(fp32_sequence[0, prompt:].unique().numel()),
    }
    for label, name in added.items():
        logits = runner.teacher_forced_logits(name, fp32_sequence)  # (1, seq, vocab)
        answer = answers[name][0, prompt:]
        quality[f"{label}_token_agreement"] = (answer == fp32_sequence[0, prompt:]).float().mean().item()
        quality[f"{label}_teacher_forced_agreement"] = (
            (logits[0, prompt - 1 : -1].argmax(-1) == fp32_next.argmax(-1)).float().mean().item()
        )
        quality[f"{label}_max_logit_diff"] = (logits - fp32_logits).abs().max().item()
    return quality


def run(args) -> dict:
    _, _, _, new_tokens, batch_tokens = SIZES[args.size]
    new_tokens = args.new_tokens or new_tokens
    dtype = DTYPES[args.dtype]
    skipped = precision_skips(args.precisions, args.device, dtype)
    reference, ours = build_models(args.size, dtype, args.device)
    runner = Runner(reference, ours, args.size, args.device, dtype, args.repeats)
    report = {"size": args.size, "dtype": args.dtype, "device": args.device, "repeats": args.repeats,
              "parameters_m": sum(p.numel() for p in ours.parameters()) / 1e6, "environment": environment(args.device),
              "skipped_precisions": skipped}
    added = add_precision_models(runner, reference, ours, [p for p in args.precisions if p not in skipped], args.device)
    base = PRECISION_OF_DTYPE[args.dtype]
    labels = {base: "ours", **added}  # precision -> our model in it
    bf16 = ("reference_bf16", "ours_bf16") if "bf16" in added else ()

    report["bandwidth_mib"] = args.bandwidth_mib
    report["memory_bandwidth_gb_s"] = memory_bandwidth(args.device, args.bandwidth_mib)
    report["decode_bytes_per_token"] = {label: decode_bytes_per_token(runner.models[name])
                                        for label, name in labels.items()}
    report["floor_tok_s"] = {label: report["memory_bandwidth_gb_s"] * 1e9 / nbytes
                             for label, nbytes in report["decode_bytes_per_token"].items()}
    for label in ("int8", "int4"):
        if label in added:
            report[f"{label}_activation_dtype"] = str(runner.models[added[label]].dtype).removeprefix("torch.")

    report["vision_s"] = runner.vision()
    quantized = tuple(added[label] for label in ("int8", "int4") if label in added)
    prefill = runner.prefill(("reference", "ours", *bf16, *quantized))
    report["prefill_s"] = {name: prefill[name] for name in ("reference", "ours")}
    default, default_tokens = runner.decode("default", new_tokens, ("reference", "ours", *bf16))
    report["decode_default_tok_s"] = {name: default[name] for name in ("reference", "ours")}
    report["compile_warmup_s"] = {name: runner.compile_warmup(name, new_tokens) for name in ("ours", "reference")}
    report["precision_compile_warmup_s"] = {label: runner.compile_warmup(name, new_tokens)
                                            for label, name in added.items()}
    # both fp32 models on the chat path's settings; the other precisions on ours only, as ChatSession runs them
    chat, chat_tokens = runner.decode("chat", new_tokens, ("reference", "ours", *added.values()))
    report["decode_chat_path_tok_s"] = {name: chat[name] for name in ("reference", "ours")}
    static, static_tokens = runner.decode("static", new_tokens, names=("ours",))
    report["decode_static_eager_ours_tok_s"] = static["ours"]
    report["greedy_tokens_equal"] = all(
        torch.equal(default_tokens["reference"], tokens) for tokens in
        (default_tokens["ours"], chat_tokens["ours"], chat_tokens["reference"], static_tokens["ours"])
    )
    report["batch8_tok_s"] = runner.batch8(batch_tokens)
    report["multiturn_ttft_s"] = runner.multiturn()
    if added:
        report.update(precision_quality(runner, chat_tokens["ours"], chat_tokens, added))
    for name in list(runner.models)[2:]:  # the precision models are measured; free them before the load subprocesses
        del runner.models[name]
    report.update(load_and_rss(reference, ours, args.size, args.device, args.dtype, args.load_repeats))

    ratio = lambda key: report[key]["ours"] / report[key]["reference"]  # noqa: E731
    report["vision_ratio"] = ratio("vision_s")
    report["prefill_ratio"] = ratio("prefill_s")
    report["decode_speedup"] = report["decode_chat_path_tok_s"]["ours"] / report["decode_default_tok_s"]["reference"]
    report["decode_same_settings_speedup"] = ratio("decode_default_tok_s")
    report["decode_chat_path_same_settings_speedup"] = ratio("decode_chat_path_tok_s")
    report["batch8_speedup"] = ratio("batch8_tok_s")
    report["multiturn_ttft_speedup"] = report["multiturn_ttft_s"]["reference"] / report["multiturn_ttft_s"]["ours"]
    report["rss_ratio"] = ratio("peak_rss_mb")
    report["load_ratio"] = ratio("load_s")
    report[f"{base}_floor_fraction"] = report["decode_chat_path_tok_s"]["ours"] / report["floor_tok_s"][base]
    # The precision figures, all against the reference's fp32 default path in this run (issue 14): prefill as a time
    # ratio (below 1 is faster), decode as ours on ChatSession's path / the reference's default generate().
    if "bf16" in added:
        report["bf16_prefill_s"] = {"reference": prefill["reference_bf16"], "ours": prefill["ours_bf16"]}
        report["bf16_decode_default_tok_s"] = {"reference": default["reference_bf16"], "ours": default["ours_bf16"]}
        report["bf16_decode_chat_path_tok_s"] = chat["ours_bf16"]
        report["bf16_prefill_ratio"] = prefill["ours_bf16"] / prefill["reference"]
        report["bf16_prefill_same_settings_ratio"] = ratio("bf16_prefill_s")  # both in bf16
        report["bf16_decode_speedup"] = chat["ours_bf16"] / default["reference"]
        report["bf16_default_same_settings_speedup"] = ratio("bf16_decode_default_tok_s")  # both bf16, default
        report["bf16_floor_fraction"] = chat["ours_bf16"] / report["floor_tok_s"]["bf16"]
    for label in ("int8", "int4"):
        if label in added:
            name = added[label]
            report[f"{label}_prefill_s"] = prefill[name]
            report[f"{label}_decode_chat_path_tok_s"] = chat[name]
            report[f"{label}_prefill_ratio"] = prefill[name] / prefill["reference"]
            report[f"{label}_decode_speedup"] = chat[name] / default["reference"]
            report[f"{label}_floor_fraction"] = chat[name] / report["floor_tok_s"][label]
    return report


def format_table(report: dict) -> str:
    rows = [
        ("vision tower (s)", "vision_s", "vision_ratio", "lower"),
        ("prefill = TTFT, 1 image (s)", "prefill_s", "prefill_ratio", "lower"),
        ("decode, default generate() (tok/s)", "decode_default_tok_s", "decode_same_settings_speedup", "higher"),
        ("decode, chat path: static + compile (tok/s)", "decode_chat_path_tok_s",
         "decode_chat_path_same_settings_speedup", "higher"),
        ("batch-8 throughput (tok/s)", "batch8_tok_s", "batch8_speedup", "higher"),
        ("2nd question TTFT (s)", "multiturn_ttft_s", "multiturn_ttft_speedup", "speedup"),
        ("bf16 prefill, both bf16 (s)", "bf16_prefill_s", "bf16_prefill_same_settings_ratio", "lower"),
        ("bf16 decode, both default generate() (tok/s)", "bf16_decode_default_tok_s",
         "bf16_default_same_settings_speedup", "higher"),
        ("load from checkpoint (s)", "load_s", "load_ratio", "lower"),
        ("peak RSS (MB)", "peak_rss_mb", "rss_ratio", "lower"),
    ]
    env = report["environment"]
    lines = [
        f"llava-ext {env['llava_ext']} | torch {env['torch']} | transformers {env['transformers']} | "
        f"python {env['python']} | {env.get('gpu', env['cpu'])} ({env['cpu_threads']} threads)",
        f"size {report['size']} ({report['parameters_m']:.0f}M parameters), {report['dtype']}, {report['device']}, "
        f"medians of {report['repeats']} alternating repeats",
        "",
        f"{'':46}{'reference':>12}{'ours':>12}{'ratio':>9}",
    ]
    for label, key, ratio_key, _ in rows:
        if key in report:
            values = report[key]
            lines.append(f"{label:46}{values['reference']:12.4g}{values['ours']:12.4g}{report[ratio_key]:9.3f}")
    lines += [
        "",
        "time ratios are ours/reference (lower is better); tok/s and TTFT ratios are speedups (higher is better)",
        f"decode_speedup (ours chat path vs reference default generate): {report['decode_speedup']:.3f}",
        f"decode, ours static cache without compile (tok/s): {report['decode_static_eager_ours_tok_s']:.4g}",
        f"compile warm-up (first compiled generate beyond a warm one, s): ours {report['compile_warmup_s']['ours']:.1f}, "
        f"reference {report['compile_warmup_s']['reference']:.1f}",
        f"greedy tokens equal on every path: {report['greedy_tokens_equal']}; "
        f"2nd-question first token equal: {report['multiturn_ttft_s']['same_token']}",
        "",
    ]
    return "\n".join(lines + format_precisions(report))


# issue 14's targets on the small benchmark: (key, bound, "min" or "max")
TARGETS = (
    ("int8_decode_speedup", 4.0, "min"),
    ("int8_floor_fraction", 0.70, "min"),
    ("bf16_decode_speedup", 3.0, "min"),
    ("bf16_prefill_ratio", 0.5, "max"),
)


def format_precisions(report: dict) -> list[str]:
    """The precision rows: ours in each precision against the reference's fp32 default path and the weight floor."""
    fp32_prefill, fp32_decode = report["prefill_s"]["reference"], report["decode_default_tok_s"]["reference"]
    bandwidth = report["memory_bandwidth_gb_s"]
    lines = [
        f"memory bandwidth: {bandwidth:.1f} GB/s (a {report['bandwidth_mib']} MiB tensor copy, bytes read + written "
        "/ best of 5 times)",
        "precisions: ours decodes on ChatSession's path, the reference with its default generate(); 'x ref fp32' is "
        "against the reference's fp32 prefill (time ratio) and decode (speedup); floor = bandwidth / bytes of weights "
        "read per token; tokens=fp32 / teacher-f.: greedy-token agreement with our fp32 answer, free-running / fed "
        "fp32's answer",
        f"{'':22}{'prefill s':>10}{'x ref fp32':>11}{'decode tok/s':>13}{'x ref fp32':>11}{'floor tok/s':>12}"
        f"{'of floor':>9}{'tokens=fp32':>12}{'teacher-f.':>11}{'max|dlogit|':>12}",
    ]
    number = lambda value, width, spec: f"{value:{width}{spec}}" if value is not None else " " * width  # noqa: E731
    base = PRECISION_OF_DTYPE[report["dtype"]]  # the run's own dtype (fp32 on CPU)
    rows = [(f"reference {base}", fp32_prefill, fp32_decode, None)]
    if "bf16_prefill_s" in report:
        rows.append(("reference bf16", report["bf16_prefill_s"]["reference"],
                     report["bf16_decode_default_tok_s"]["reference"], None))
    rows.append((f"ours {base}", report["prefill_s"]["ours"], report["decode_chat_path_tok_s"]["ours"], base))
    if "bf16_prefill_s" in report:
        rows.append(("ours bf16", report["bf16_prefill_s"]["ours"], report["bf16_decode_chat_path_tok_s"], "bf16"))
    for label in ("int8", "int4"):
        if f"{label}_prefill_s" in report:
            rows.append((f"ours {label} ({report[f'{label}_activation_dtype']})", report[f"{label}_prefill_s"],
                         report[f"{label}_decode_chat_path_tok_s"], label))
    for label, prefill, decode, precision in rows:
        floor = report["floor_tok_s"].get(precision) if precision else None
        agreement = report.get(f"{precision}_token_agreement") if precision else None
        forced = report.get(f"{precision}_teacher_forced_agreement") if precision else None
        diff = report.get(f"{precision}_max_logit_diff") if precision else None
        lines.append((
            f"{label:22}{prefill:10.4g}{prefill / fp32_prefill:11.3f}{decode:13.4g}{decode / fp32_decode:11.3f}"
            f"{number(floor, 12, '.4g')}{number(floor and decode / floor, 9, '.3f')}{number(agreement, 12, '.3f')}"
            f"{number(forced, 11, '.3f')}{number(diff, 12, '.3g')}"
        ).rstrip())
    if "fp32_logit_margin" in report:
        margin = report["fp32_logit_margin"]
        lines.append(
            f"fp32 top-1 minus top-2 logit over the answer: median {margin['median']:.3g}, min {margin['min']:.3g} "
            f"({report['fp32_answer_distinct_tokens']} distinct tokens); compile warm-up (s): "
            + ", ".join(f"{label} {seconds:.1f}" for label, seconds in report["precision_compile_warmup_s"].items())
        )
    met = []
    for key, bound, kind in TARGETS:
        if key in report:
            ok = report[key] >= bound if kind == "min" else report[key] <= bound
            met.append(f"{key} {report[key]:.3f} {'>=' if kind == 'min' else '<='} {bound} "
                       f"{'met' if ok else 'NOT met'}")
    if met:
        lines.append("targets (issue 14, small size): " + "; ".join(met))
    for precision, reason in report["skipped_precisions"].items():
        lines.append(f"{precision}: skipped, {reason}")
    return lines


def precision_list(text: str) -> list[str]:
    """`--precisions` parser: "fp32,int8" -> ["fp32", "int8"]; fp32 is added, being the baseline."""
    precisions = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in precisions if item not in PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)} is not a precision; choose from {','.join(PRECISIONS)} (e.g. --precisions fp32,bf16)"
        )
    return ["fp32"] + [item for item in PRECISIONS[1:] if item in precisions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "example: python benchmarks/bench_inference.py --size small --repeats 5 --json bench.json"))
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-repeats", type=int, default=7, help="fresh processes per model for load and RSS")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default: 128; tiny: 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--precisions", type=precision_list, default=list(PRECISIONS),
        help="comma-separated, from fp32,bf16,int8,int4 (default: all); fp32 is the baseline and always runs. bf16, "
        "int8 and int4 run on CPU fp32 runs; one this machine cannot run (no torchao, no native bf16) is skipped with "
        "a note",
    )
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the memory-bandwidth copy")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
