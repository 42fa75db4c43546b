"""Attention implementations side by side on one llava_ext model: logits agreement and speed.

One random model (the shapes of `bench_inference.py --size`), built directly on the device in the chosen dtype, runs
the same one-image prompt under each `--implementations` entry in turn (`model.set_attn_implementation`), alternating
`--repeats` times. It prints the prefill time, the decode tokens/s of a greedy `generate()`, the largest logits
difference from the first implementation and whether the greedy tokens are equal.

    python benchmarks/bench_attention.py --size 7b-shapes --device cuda --dtype bfloat16   # sdpa vs flash_attention_2
    python benchmarks/bench_attention.py --size tiny --implementations sdpa,eager          # CPU smoke run
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import DTYPES, SIZES, build_config, build_inputs, environment, greedy, timed, TokenClock  # noqa: E402

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration  # noqa: E402


def build_model(size: str, dtype: torch.dtype, device: str) -> LlavaExtForConditionalGeneration:
    """A random llava_ext model allocated on `device` in `dtype` (a 7B model never passes through CPU fp32)."""
    torch.manual_seed(0)
    config = LlavaExtConfig(**build_config(size).to_dict())
    with torch.device(device):
        model = LlavaExtForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def run(args) -> dict:
    _, _, _, new_tokens, _ = SIZES[args.size]
    new_tokens = args.new_tokens or new_tokens
    dtype = DTYPES[args.dtype]
    model = build_model(args.size, dtype, args.device)
    inputs = build_inputs(model.config, args.size, 1, args.device, dtype)
    samples = {name: {"prefill_s": [], "decode_tok_s": []} for name in args.implementations}
    logits, tokens = {}, {}

    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for name in args.implementations:
            model.set_attn_implementation(name)
            seconds, output = timed(lambda: model(**inputs), args.device)
            clock = TokenClock(args.device)
            tokens[name] = greedy(model, inputs, new_tokens, streamer=clock)
            if repeat:
                samples[name]["prefill_s"].append(seconds)
                samples[name]["decode_tok_s"].append(clock.tokens_per_second())
            logits[name] = output.logits.float()  # (1, seq, vocab)

    first = args.implementations[0]
    report = {"size": args.size, "dtype": args.dtype, "device": args.device, "repeats": args.repeats,
              "environment": environment(args.device), "implementations": {}}
    for name in args.implementations:
        report["implementations"][name] = {
            "prefill_s": statistics.median(samples[name]["prefill_s"]),
            "decode_tok_s": statistics.median(samples[name]["decode_tok_s"]),
            "max_abs_logits_diff": float((logits[name] - logits[first]).abs().max()),
            "greedy_tokens_equal": bool(torch.equal(tokens[name], tokens[first])),
        }
    return report


def format_table(report: dict) -> str:
    env = report["environment"]
    first = next(iter(report["implementations"]))
    lines = [
        f"torch {env['torch']} | transformers {env['transformers']} | {env.get('gpu', env['cpu'])}",
        f"size {report['size']}, {report['dtype']}, {report['device']}, medians of {report['repeats']}",
        "",
        f"{'attention':22}{'prefill (s)':>13}{'decode (tok/s)':>16}{f'max|logits - {first}|':>26}{'tokens equal':>14}",
    ]
    for name, row in report["implementations"].items():
        lines.append(f"{name:22}{row['prefill_s']:13.4g}{row['decode_tok_s']:16.4g}"
                     f"{row['max_abs_logits_diff']:26.3g}{str(row['greedy_tokens_equal']):>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "example: python benchmarks/bench_attention.py --size 7b-shapes --device cuda --dtype bfloat16 "
        "--implementations sdpa,flash_attention_2 --json attention.json"))
    parser.add_argument("--size", choices=list(SIZES), default="7b-shapes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--implementations", type=lambda text: text.split(","), default=["sdpa", "flash_attention_2"],
                        help="comma-separated attn_implementation names; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default: 128; tiny: 8)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
