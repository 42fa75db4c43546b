"""Side-by-side inference benchmark: transformers' `LlavaForConditionalGeneration` vs `LlavaExtForConditionalGeneration`.

Both models come from one random config with the same weights and run in one process, alternating, `--repeats`
times; the table shows medians and ratios (time ratios ours/reference: below 1 is faster; speedups
reference/ours: above 1 is faster). Load time and peak RSS are measured in one fresh subprocess per model and repeat,
`--load-repeats` times: a ~0.1 s load in a new process varies by tens of percent from run to run.

    python benchmarks/bench_inference.py                      # "small": ~256M parameters, fp32, CPU
    python benchmarks/bench_inference.py --size tiny --json out.json   # CI smoke run
    python benchmarks/bench_inference.py --size 7b-shapes --device cuda --dtype float16

"decode (chat path)" is what `ChatSession` / `llava-ext chat` run by default: a `StaticCache` and a compiled decode
step (`llava_ext.chat.decode_compile_config` under `decode_compile_settings`: on CPU, frozen weights and inductor's
C++ GEMM kernels); its compile warm-up is reported on its own line.
"""

import argparse
import contextlib
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
    CACHE_BLOCK, decode_compile_config, decode_compile_settings, new_static_cache, truncate_cache,
)
from llava_ext.compat import CACHE_KWARG, BaseStreamer

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
    reference = LlavaForConditionalGeneration(config).to(dtype=dtype, device=device).eval()
    ours = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict()))
    ours.load_state_dict(reference.state_dict())
    return reference, ours.to(dtype=dtype, device=device).eval()


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
    """Alternates reference and ours `repeats` times per measurement; keeps every sample."""

    def __init__(self, reference, ours, size: str, device: str, dtype: torch.dtype, repeats: int):
        self.models = {"reference": reference, "ours": ours}
        self.size, self.device, self.dtype, self.repeats = size, device, dtype, repeats
        self.config = reference.config
        self.inputs = build_inputs(self.config, size, 1, device, dtype)
        self.caches = {}

    def alternate(self, measure) -> dict[str, float]:
        """Median of `measure(name, model)` per model, one warm-up call each, calls interleaved."""
        samples = {name: [] for name in self.models}
        for name, model in self.models.items():
            measure(name, model)
        for _ in range(self.repeats):
            for name, model in self.models.items():
                samples[name].append(measure(name, model))
        return {name: statistics.median(values) for name, values in samples.items()}

    @torch.no_grad()
    def vision(self):
        pixel_values = self.inputs["pixel_values"]
        return self.alternate(lambda name, model: timed(lambda: model.get_image_features(pixel_values), self.device)[0])

    @torch.no_grad()
    def prefill(self):
        return self.alternate(lambda name, model: timed(lambda: model(**self.inputs, logits_to_keep=1), self.device)[0])

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
            kwargs["compile_config"] = decode_compile_config(torch.device(self.device))
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
            if name not in names:
                return float("nan")
            clock = TokenClock(self.device)
            kwargs = self.decode_kwargs(name, path, new_tokens)
            with self.settings(path):
                outputs[name] = greedy(model, self.inputs, new_tokens, streamer=clock, **kwargs)
            return clock.tokens_per_second()

        return self.alternate(measure), outputs

    @torch.no_grad()
    def compile_warmup(self, name: str, new_tokens: int) -> float:
        """Seconds the first compiled generate takes beyond a warm one."""
        model = self.models[name]
        with self.settings("chat"):
            first, _ = timed(lambda: greedy(model, self.inputs, 8, **self.decode_kwargs(name, "chat", 8)), self.device)
            warm, _ = timed(lambda: greedy(model, self.inputs, 8, **self.decode_kwargs(name, "chat", 8)), self.device)
        return first - warm

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


def run(args) -> dict:
    _, _, _, new_tokens, batch_tokens = SIZES[args.size]
    new_tokens = args.new_tokens or new_tokens
    dtype = DTYPES[args.dtype]
    reference, ours = build_models(args.size, dtype, args.device)
    runner = Runner(reference, ours, args.size, args.device, dtype, args.repeats)
    report = {"size": args.size, "dtype": args.dtype, "device": args.device, "repeats": args.repeats,
              "parameters_m": sum(p.numel() for p in ours.parameters()) / 1e6, "environment": environment(args.device)}

    report["vision_s"] = runner.vision()
    report["prefill_s"] = runner.prefill()
    default, default_tokens = runner.decode("default", new_tokens)
    report["decode_default_tok_s"] = default
    report["compile_warmup_s"] = {name: runner.compile_warmup(name, new_tokens) for name in ("ours", "reference")}
    chat, chat_tokens = runner.decode("chat", new_tokens)  # both models on the chat path's settings
    report["decode_chat_path_tok_s"] = chat
    static, static_tokens = runner.decode("static", new_tokens, names=("ours",))
    report["decode_static_eager_ours_tok_s"] = static["ours"]
    report["greedy_tokens_equal"] = all(
        torch.equal(default_tokens["reference"], tokens) for tokens in
        (default_tokens["ours"], chat_tokens["ours"], chat_tokens["reference"], static_tokens["ours"])
    )
    report["batch8_tok_s"] = runner.batch8(batch_tokens)
    report["multiturn_ttft_s"] = runner.multiturn()
    if args.bf16 and dtype == torch.float32 and args.device == "cpu":
        bf16 = Runner(reference.to(torch.bfloat16), ours.to(torch.bfloat16), args.size, args.device, torch.bfloat16,
                      args.repeats)
        report["bf16_prefill_s"] = bf16.prefill()
        report["bf16_decode_default_tok_s"] = bf16.decode("default", new_tokens)[0]
        reference.float(), ours.float()
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
    if "bf16_prefill_s" in report:
        report["bf16_prefill_ratio"] = ratio("bf16_prefill_s")
        report["bf16_decode_speedup"] = ratio("bf16_decode_default_tok_s")
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
        ("bf16 prefill (s)", "bf16_prefill_s", "bf16_prefill_ratio", "lower"),
        ("bf16 decode, default generate() (tok/s)", "bf16_decode_default_tok_s", "bf16_decode_speedup", "higher"),
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
    ]
    return "\n".join(lines)


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
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 rows (CPU fp32 runs)")
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
