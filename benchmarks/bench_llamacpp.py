"""Side-by-side CPU benchmark: our model on ChatSession's path vs llama.cpp on the GGUF files `llava-ext export` writes.

One random, confident model (`bench_inference.make_confident`) per size, saved as a llava_ext checkpoint with a
Llama-2-style tokenizer of its vocabulary size and exported to GGUF f32, bf16 and q8_0 (and Q4_K_M with
`llama-quantize`, for our int4 once `llava_ext.quantization` offers it); the same prompt shape (`<s>`, one image's
576 placeholders, 40 text tokens) and a 336 x 336 image on both sides:

    ours fp32 | bf16 | int8 weight-only (bf16 rest) | int4    vs    llama.cpp f32 | bf16 | Q8_0 | Q4_K_M

- decode, batch 1 (tok/s): ours as `bench_inference.Runner.decode("chat")` times it (static cache, compiled step,
  after the prompt); llama.cpp's `llama-bench -n NEW -d PROMPT` (NEW tokens after a PROMPT-token context).
- prefill of the whole prompt (s): ours `Runner.prefill` (tower + projector + language model, as ChatSession runs
  it); llama.cpp: its image encode + `llama-bench -p PROMPT` (the prompt as text tokens: the image's embeddings cost
  the language model what tokens do).
- image encode (s): ours `get_image_features`; llama.cpp: `mtmd_encode_chunk` timed by llava-ext-probe.
- peak RSS (MB): a fresh process each, VmHWM / ru_maxrss: ours loading the checkpoint, converting to the precision
  and generating 8 tokens from the image prompt; `llama-mtmd-cli` doing the same.

The "1b" size (TinyLlama-1.1B's language model, the small size's vision tower) is where reading the weights dominates
decode; its fp32 rows are left out (`--precisions`). Both sides use `--threads` threads (default: all cores). Needs the
tools `benchmarks/build_llamacpp.sh` builds (LLAVA_EXT_LLAMA_CPP or its default directory).

    python benchmarks/bench_llamacpp.py --sizes small --repeats 3 --json llamacpp.json
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
import bench_inference  # noqa: E402
from bench_inference import Runner, environment, make_confident  # noqa: E402

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, LlavaExtProcessor  # noqa: E402
from llava_ext import quantization  # noqa: E402
from llava_ext.convert import export_gguf  # noqa: E402
from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor  # noqa: E402

LLAMA_CPP = Path(os.environ.get("LLAVA_EXT_LLAMA_CPP", Path.home() / ".cache/llava-ext/llama.cpp-0.3.36/bin"))
# bench_inference's sizes plus "1b": TinyLlama-1.1B's language model (GQA, 4 kv heads) behind the small's tower
bench_inference.SIZES.setdefault("1b", (
    bench_inference.SIZES["small"][0],
    dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
         num_key_value_heads=4, vocab_size=32064),
    40, 128, 32,
))
# precision: (our model's dtype / quantization, the GGUF type llama.cpp runs beside it)
PAIRS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_k_m"}
DEFAULT_PRECISIONS = {"small": ("fp32", "bf16", "int8", "int4"), "1b": ("bf16", "int8", "int4")}


# ------------------------------------------------------------------------------------------------ the checkpoint
def llama_tokenizer(num_pieces: int) -> PreTrainedTokenizerFast:
    """Llama-2's kind of tokenizer (as tests/test_gguf.py builds it) padded to `num_pieces` pieces, then <image> and
    <pad>: `<unk> <s> </s>`, the 256 byte-fallback pieces, "▁", letters and digits, then "▁w<i>" fillers."""
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + ["\u2581"]
    vocab += list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'")
    vocab += [f"\u2581w{index}" for index in range(num_pieces - len(vocab))]
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(vocab)}, merges=[],
                                   unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # one call each: <image> first
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_model(size: str) -> LlavaExtForConditionalGeneration:
    """bench_inference's random config and confident weights, in fp32."""
    torch.manual_seed(0)
    config = bench_inference.build_config(size)
    config.text_config.pad_token_id = config.image_token_index + 1  # <pad>, after <image>
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict()))
    make_confident(model)
    return model.eval()


def save_checkpoint(model, directory: Path) -> Path:
    config = model.config
    tokenizer = llama_tokenizer(config.image_token_index)
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    model.save_pretrained(directory)
    size = config.vision_config.image_size
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaExtProcessor(image_processor, tokenizer, patch_size=config.vision_config.patch_size,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(directory)
    return directory


def export_all(checkpoint: Path, out: Path, gguf_types) -> dict[str, tuple[Path, Path]]:
    """{GGUF type: (language model, mmproj)}; Q4_K_M by llama-quantize from the f32 file (mmproj f32)."""
    files = {}
    for outtype in ("f32", "bf16", "q8_0"):
        if outtype in gguf_types or (outtype == "f32" and "q4_k_m" in gguf_types):
            files[outtype] = export_gguf(checkpoint, out / outtype, outtype, progress=False)
    if "q4_k_m" in gguf_types:
        lm, mmproj = files["f32"]
        q4 = out / "model-q4_k_m.gguf"
        subprocess.run([str(LLAMA_CPP / "llama-quantize"), str(lm), str(q4), "Q4_K_M"], check=True,
                       capture_output=True)
        files["q4_k_m"] = (q4, mmproj)
    return files


# --------------------------------------------------------------------------------------------------- llama.cpp
def parse_llama_bench(text: str) -> dict[str, float]:
    """`llama-bench -o json` records -> {"prefill_tok_s", "decode_tok_s", "decode_depth"} (whichever ran)."""
    result = {}
    for record in json.loads(text):
        if record["n_gen"] > 0:
            result["decode_tok_s"], result["decode_depth"] = record["avg_ts"], record.get("n_depth", 0)
        else:
            result["prefill_tok_s"] = record["avg_ts"]
    return result


def llama_bench(model: Path, prompt: int, new_tokens: int, threads: int, repeats: int) -> dict[str, float]:
    """Prefill of `prompt` tokens, and `new_tokens` decoded after a `prompt`-token context (two runs: -d applies to
    both kinds of test)."""
    common = [str(LLAMA_CPP / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    prefill = subprocess.run(common + ["-p", str(prompt), "-n", "0"], capture_output=True, text=True, check=True)
    decode = subprocess.run(common + ["-p", "0", "-n", str(new_tokens), "-d", str(prompt)], capture_output=True,
                            text=True, check=True)
    return {**parse_llama_bench(prefill.stdout), **parse_llama_bench(decode.stdout)}


def llama_image_encode_s(lm: Path, mmproj: Path, image: Path, threads: int, repeats: int) -> float:
    """Median seconds of llama.cpp's image encode (llava-ext-probe `image`, ENCODE_MS), one process per sample."""
    samples = []
    for _ in range(repeats + 1):  # the first loads the files into the page cache
        output = subprocess.run([str(LLAMA_CPP / "llava-ext-probe"), "image", str(lm), str(mmproj), str(image),
                                 str(threads)], capture_output=True, text=True, check=True).stdout
        samples.append(float(next(line.split()[1] for line in output.splitlines() if line.startswith("ENCODE_MS"))))
    return statistics.median(samples[1:]) / 1e3


PEAK_RSS = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True, check=True); " \
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def llama_peak_rss_mb(lm: Path, mmproj: Path, image: Path, threads: int) -> float:
    """Peak RSS of llama-mtmd-cli answering 8 tokens about the image (ru_maxrss of its only child, in a fresh
    interpreter)."""
    command = [str(LLAMA_CPP / "llama-mtmd-cli"), "-m", str(lm), "--mmproj", str(mmproj), "--image", str(image),
               "-p", "Describe the image.", "-n", "8", "--temp", "0", "-t", str(threads)]
    output = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True, check=True)
    return int(output.stdout.split()[-1]) / 1024


# -------------------------------------------------------------------------------------------------------- ours
def our_models(model, precisions) -> dict[str, torch.nn.Module]:
    """{precision: our model}, from the fp32 weights, as bench_inference's precision rows make them."""
    models = {}
    if "fp32" in precisions:
        models["fp32"] = model
    if "bf16" in precisions:
        models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    if "int8" in precisions:
        dtype = quantization.int8_default_dtype("cpu")
        models["int8"] = quantization.quantize_int8_weight_only(copy.deepcopy(model).to(dtype))
    if "int4" in precisions:
        models["int4"] = quantization.quantize_int4_weight_only(copy.deepcopy(model).to(torch.bfloat16))
    return models


OUR_PEAK_RSS = r"""
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
from bench_inference import build_inputs
from bench_llamacpp import our_models
from llava_ext import LlavaExtForConditionalGeneration
torch.set_num_threads({threads})
model = LlavaExtForConditionalGeneration.from_pretrained({path!r}, dtype=torch.float32).eval()
model = our_models(model, [{precision!r}])[{precision!r}]
inputs = build_inputs(model.config, {size!r}, 1, "cpu", model.dtype)
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024)
"""


def our_peak_rss_mb(checkpoint: Path, size: str, precision: str, threads: int) -> float:
    """Peak RSS of a fresh process loading the fp32 checkpoint, converting it and generating 8 tokens (its VmHWM:
    the fp32 load is part of what our int8 / bf16 path costs, as `llava-ext chat --quantize int8` runs it)."""
    code = OUR_PEAK_RSS.format(bench_dir=str(Path(__file__).parent), path=str(checkpoint), size=size,
                               precision=precision, threads=threads)
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.split()[-1])


# --------------------------------------------------------------------------------------------------------- run
def save_image(pixel_values: torch.Tensor, path: Path) -> Path:
    """The benchmark's random image, as a PNG (llama.cpp reads files): (1, 3, size, size) in ~N(0, 1) -> 8 bits."""
    pixels = (pixel_values[0].permute(1, 2, 0).float().numpy() * 64 + 128).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run_size(size: str, precisions, threads: int, repeats: int, new_tokens: int, workdir: Path) -> dict:
    model = build_model(size)
    checkpoint = save_checkpoint(model, workdir / f"{size}-checkpoint")
    files = export_all(checkpoint, workdir / f"{size}-gguf", [PAIRS[p] for p in precisions])
    models = our_models(model, precisions)
    runner = Runner(model, model, size, "cpu", torch.float32, repeats)
    for precision, ours in models.items():
        runner.add(precision, ours)
    prompt = runner.inputs["input_ids"].shape[1]
    image = save_image(runner.inputs["pixel_values"], workdir / f"{size}-image.png")
    report = {"size": size, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "prompt_tokens": prompt,
              "new_tokens": new_tokens, "rows": {}}
    names = tuple(models)
    decode, _ = runner.decode("chat", new_tokens, names)
    prefill = runner.prefill(names)
    vision = runner.alternate(
        lambda name, ours: bench_inference.timed(
            lambda: ours.get_image_features(runner.model_inputs[name]["pixel_values"]), "cpu")[0], names)
    for precision in precisions:
        gguf_type = PAIRS[precision]
        lm, mmproj = files[gguf_type]
        bench = llama_bench(lm, prompt, new_tokens, threads, repeats)
        encode = llama_image_encode_s(lm, mmproj, image, threads, repeats)
        report["rows"][precision] = {
            "gguf": gguf_type,
            "ours": {"decode_tok_s": decode[precision], "prefill_s": prefill[precision],
                     "image_encode_s": vision[precision],
                     "peak_rss_mb": our_peak_rss_mb(checkpoint, size, precision, threads)},
            "llama_cpp": {"decode_tok_s": bench["decode_tok_s"], "decode_depth": bench["decode_depth"],
                          "prefill_s": encode + prompt / bench["prefill_tok_s"], "text_prefill_tok_s":
                          bench["prefill_tok_s"], "image_encode_s": encode,
                          "peak_rss_mb": llama_peak_rss_mb(lm, mmproj, image, threads)},
        }
    return report


METRICS = (  # key, label, higher is better
    ("decode_tok_s", "decode tok/s", True),
    ("prefill_s", "prefill s", False),
    ("image_encode_s", "image encode s", False),
    ("peak_rss_mb", "peak RSS MB", False),
)


def format_table(report: dict) -> str:
    """One line per precision pair and metric: ours, llama.cpp, ours/llama.cpp."""
    lines = [f"{'':34}{'ours':>10}{'llama.cpp':>11}{'ours/l.cpp':>12}"]
    for size in report["sizes"]:
        lines.append(f"size {size['size']} ({size['parameters_m']:.0f}M parameters, prompt {size['prompt_tokens']} "
                     f"tokens, {size['new_tokens']} decoded)")
        for precision, row in size["rows"].items():
            for key, label, _ in METRICS:
                ours, theirs = row["ours"][key], row["llama_cpp"][key]
                lines.append(f"  {precision + ' vs ' + row['gguf'] + ', ' + label:32}{ours:10.4g}{theirs:11.4g}"
                             f"{ours / theirs:12.3f}")
    lines += ["", "tok/s ratios above 1 and time / memory ratios below 1 favour ours"]
    return "\n".join(lines)


def precision_list(text: str) -> list[str]:
    precisions = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in precisions if item not in PAIRS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)} is not a precision; choose from {','.join(PAIRS)}")
    return precisions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "example: python benchmarks/bench_llamacpp.py --sizes small,1b --repeats 3 --json llamacpp.json"))
    parser.add_argument("--sizes", type=lambda text: text.split(","), default=["small"],
                        help="comma-separated, from small,1b (default: small)")
    parser.add_argument("--precisions", type=precision_list, default=None,
                        help="comma-separated, from fp32,bf16,int8,int4 (default: all on small, no fp32 on 1b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    unknown = [size for size in args.sizes if size not in DEFAULT_PRECISIONS]
    if unknown:
        parser.error(f"--sizes {','.join(unknown)}: choose from {','.join(DEFAULT_PRECISIONS)}")
    missing = [tool for tool in ("llama-bench", "llama-mtmd-cli", "llama-quantize", "llava-ext-probe")
               if not (LLAMA_CPP / tool).is_file()]
    if missing:
        parser.error(f"{', '.join(missing)} not in {LLAMA_CPP}: build them with benchmarks/build_llamacpp.sh "
                     "(LLAVA_EXT_LLAMA_CPP=BUILD_DIR/bin for another directory)")
    torch.set_num_threads(args.threads)
    report = {"environment": {**environment("cpu"), "llama_cpp": "llama-cpp-python 0.3.36's vendor/llama.cpp",
                              "threads": args.threads}, "repeats": args.repeats, "sizes": [], "skipped": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            precisions = list(args.precisions or DEFAULT_PRECISIONS[size])
            if "int4" in precisions and "int4" not in quantization.QUANTIZE_CHOICES:
                precisions.remove("int4")
                report["skipped"]["int4"] = "llava_ext.quantization has no int4 yet"
            report["sizes"].append(run_size(size, precisions, args.threads, args.repeats, args.new_tokens,
                                            Path(workdir)))
            print(format_table({**report, "sizes": report["sizes"][-1:]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
