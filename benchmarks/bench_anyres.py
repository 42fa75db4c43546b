"""LLaVA-NeXT anyres side by side: vision + prefill of one image through llava_ext's LlavaExtNext and transformers'
LlavaNextForConditionalGeneration on the same random weights, in one process.

One random model with llava-v1.6's geometry (a CLIP-like tower at 336 px / patch 14, the five llava-v1.6 pinpoints)
and small widths, so that it runs on a CPU: a 672x672 image becomes a base view and 2x2 tiles (5 crops, 2928 image
tokens). Both models run the same prompt alternately, `--repeats` times after a warm-up; the table gives the median
seconds of one forward (`logits_to_keep=1`, what `generate()`'s prefill asks for), the ratio ours / transformers, and
the largest difference of their last-token logits.

    python benchmarks/bench_anyres.py                                  # CPU, fp32
    python benchmarks/bench_anyres.py --device cuda --dtype bfloat16 --repeats 10
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers import LlavaNextImageProcessorPil

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import DTYPES, environment, timed  # noqa: E402

from llava_ext import LlavaExtNextConfig, LlavaExtNextForConditionalGeneration  # noqa: E402

TILE, PATCH = 336, 14
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's
IMAGE_TOKEN_ID = 3


def build_config(width: int, vision_layers: int, text_layers: int) -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=vision_layers, num_attention_heads=8,
        image_size=TILE, patch_size=PATCH, projection_dim=width,
    )
    text = LlamaConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, max_position_embeddings=8192,
    )
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS, image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def build_inputs(reference, size: int, device: str, dtype: torch.dtype) -> dict:
    """One `size` x `size` random image (transformers' PIL image processor) and a prompt with as many image tokens
    as the reference makes of it."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    pixels = image_processor([image], return_tensors="pt")
    with torch.no_grad():
        features = reference.get_image_features(
            pixels["pixel_values"].to(device, dtype), pixels["image_sizes"].to(device)
        ).pooler_output
    input_ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * len(features[0]) + list(range(10, 30))], device=device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels["pixel_values"].to(device, dtype),  # (1, crops, 3, 336, 336)
        "image_sizes": pixels["image_sizes"].to(device),
    }


@torch.no_grad()
def run(args) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    config = build_config(args.width, args.vision_layers, args.text_layers)
    with torch.device(args.device):
        reference = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype).eval()
        ours = LlavaExtNextForConditionalGeneration._from_config(LlavaExtNextConfig(**config.to_dict()), dtype=dtype)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    inputs = build_inputs(reference, args.image_size, args.device, dtype)
    models = {"transformers LlavaNext": reference, "llava_ext LlavaExtNext": ours}
    seconds, logits = {name: [] for name in models}, {}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for name, model in models.items():
            elapsed, output = timed(lambda: model(**inputs, logits_to_keep=1), args.device)
            if repeat:
                seconds[name].append(elapsed)
            logits[name] = output.logits.float()  # (1, 1, vocab)
    reference_name = next(iter(models))
    return {
        "image_size": args.image_size, "crops": inputs["pixel_values"].shape[1],
        "image_tokens": int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()), "sequence": inputs["input_ids"].shape[1],
        "dtype": args.dtype, "device": args.device, "repeats": args.repeats, "environment": environment(args.device),
        "models": {
            name: {
                "median_s": statistics.median(seconds[name]),
                "ratio": statistics.median(seconds[name]) / statistics.median(seconds[reference_name]),
                "max_abs_logits_diff": (logits[name] - logits[reference_name]).abs().max().item(),
            }
            for name in models
        },
    }


def format_table(report: dict) -> str:
    lines = [
        f"One {report['image_size']}x{report['image_size']} image: {report['crops']} crops, "
        f"{report['image_tokens']} image tokens, {report['sequence']} tokens in all; {report['dtype']} on "
        f"{report['device']} ({report['environment'].get('gpu') or report['environment']['cpu']}, "
        f"{report['environment']['cpu_threads']} threads), median of {report['repeats']}",
        "",
        "| model | vision + prefill (s) | ratio to transformers | max abs last-token logits diff |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in report["models"].items():
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['ratio']:.2f}x | {row['max_abs_logits_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/bench_anyres.py --device cuda --dtype bfloat16 --repeats 10",
    )
    parser.add_argument("--image-size", type=int, default=672, help="side of the square image (default: 672)")
    parser.add_argument("--width", type=int, default=256, help="hidden size of tower and language model")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
