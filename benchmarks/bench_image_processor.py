"""Image processor speed: transformers' LlavaImageProcessorPil vs LlavaExtImageProcessor (PIL and torch backends).

Runs the three side by side in one process on the same synthetic photo-like images (smooth gradients + noise, no
downloads) and prints the median time per batch and the ratios. LLaVA-1.5 settings: shortest edge 336, crop 336.

    python benchmarks/bench_image_processor.py --num-images 16 --height 480 --width 640 --repeats 7
"""

import argparse
import statistics
import time

import numpy as np
import PIL.Image
import torch
from transformers import LlavaImageProcessorPil

from llava_ext.image_processing_llava_ext import LlavaExtImageProcessor


def synthetic_photos(num_images: int, height: int, width: int, seed: int = 0) -> list[PIL.Image.Image]:
    """Smooth colour gradients with sensor-like noise: resampling cost and statistics close to real photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    photos = []
    for _ in range(num_images):
        a, b, c = rng.uniform(0.05, 0.6, size=3)
        channels = [(a * x + b * y) % 256, (c * y + 0.2 * x + 64) % 256, 128 + 100 * np.sin((x + y) / (40 * a + 10))]
        pixels = np.stack(channels, axis=-1) + rng.normal(0, 10, size=(height, width, 3))
        photos.append(PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return photos


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first-call allocations and lazy imports are not what we measure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--do-pad", action="store_true", help="pad to square first (LLaVA-1.5's expand2square)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a CPU shared with other jobs, fewer threads avoid barrier stalls

    settings = dict(
        size={"shortest_edge": args.size}, crop_size={"height": args.size, "width": args.size}, do_pad=args.do_pad
    )
    photos = synthetic_photos(args.num_images, args.height, args.width)
    reference = LlavaImageProcessorPil(**settings)
    ours = LlavaExtImageProcessor(**settings)
    runs = {
        "transformers LlavaImageProcessorPil": lambda: reference(photos, return_tensors="pt"),
        "llava_ext image_backend='pil'": lambda: ours(photos, return_tensors="pt"),
        "llava_ext image_backend='torch'": lambda: ours(photos, return_tensors="pt", image_backend="torch"),
    }
    medians = {name: median_seconds(run, args.repeats) for name, run in runs.items()}

    fast, pil = runs["llava_ext image_backend='torch'"](), runs["llava_ext image_backend='pil'"]()
    difference = (fast.pixel_values - pil.pixel_values).abs()
    print(
        f"{args.num_images} images {args.width}x{args.height} -> {args.size}, do_pad={args.do_pad}, "
        f"median of {args.repeats}, torch threads={torch.get_num_threads()}"
    )
    reference_time = medians["transformers LlavaImageProcessorPil"]
    for name, seconds in medians.items():
        print(f"  {name:38s} {seconds * 1000:8.1f} ms  {reference_time / seconds:5.2f}x vs reference")
    pil_time, torch_time = medians["llava_ext image_backend='pil'"], medians["llava_ext image_backend='torch'"]
    print(f"  torch backend speed-up over PIL backend: {pil_time / torch_time:.2f}x")
    print(f"  torch vs PIL backend, normalized units: mean |diff| {difference.mean():.5f}, max {difference.max():.4f}")


if __name__ == "__main__":
    main()
