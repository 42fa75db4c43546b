"""Serving benchmark: N concurrent chat clients against `llava-ext serve` and stock `transformers serve`.

One random "small" checkpoint (bench_inference's sizes, built offline as bench_llamacpp builds it: a Llama-2-style
tokenizer, the confident weights) is saved as a llava_ext checkpoint and exported to transformers' stock llava layout
(`llava-ext export`); `transformers serve` serves the export, `llava-ext serve` the llava_ext checkpoint. Each server
runs in a subprocess on 127.0.0.1, pinned to its model, and is warmed up with one request; then, for each N, N threads
of the `openai` client each stream `--requests-per-client` chat requests (`--images` random images and a question,
greedy, `--max-tokens` tokens: end of sequence is biased away so every answer has the same length) one after another.

Reported per server and N: requests/s and output tokens/s over the wall time of the whole round, the p50/p99 latency
of a request (sent to last token) and its time to first token (TTFT), and the ratios llava-ext / stock (above 1 is
better for the rates, below 1 for the times). transformers serve runs an image-text model's requests one at a time
(5.17-5.25: its continuous batching is for LLMs), so "stock" is the one-at-a-time baseline; `--unbatched` adds
`llava-ext serve --max-batch-size 1`, the same server without its batching.

    python benchmarks/bench_serve.py                                   # "small" (~256M parameters), fp32, CPU
    python benchmarks/bench_serve.py --size tiny --clients 1,4 --max-tokens 8 --json out.json   # smoke run
    python benchmarks/bench_serve.py --device cuda --dtype float16 --size 7b-shapes --clients 1,4,16,64

Output tokens are counted as the streamed chunks that carry text (serve sends one per generated token).
"""

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import bench_inference  # noqa: E402
from bench_llamacpp import build_model, save_checkpoint  # noqa: E402

from llava_ext.convert import export_checkpoint  # noqa: E402

READY_TIMEOUT_S = 600  # hang guards: a server's start-up, a request
REQUEST_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------ the servers
def server_commands(checkpoint: Path, stock: Path, args) -> dict[str, list[str]]:
    """{name: command without --host/--port}: what `--servers` may pick."""
    device = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    transformers_cli = str(Path(sys.executable).parent / "transformers")
    llava_ext = [sys.executable, "-m", "llava_ext.cli", "serve", str(checkpoint), *device]
    commands = {
        "stock": [transformers_cli, "serve", str(stock), *device],
        "llava-ext": [*llava_ext, "--max-batch-size", str(args.max_batch_size)],
    }
    if args.unbatched:
        commands["llava-ext bs1"] = [*llava_ext, "--max-batch-size", "1"]
    return commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextlib.contextmanager
def running(command: list[str], log_path: Path):
    """The server `command` on a free loopback port; yields the port, stops the server."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not is_healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ the clients
def data_url(seed: int, size: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(seed: int, images: int, size: int) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(seed * 16 + index, size)}} for index in range(images)]
    content.append({"type": "text", "text": f"Describe picture {seed} in a few words, please."})
    return [{"role": "user", "content": content}]


def one_request(client, model: str, request: list[dict], args, eos_token_id: int) -> dict:
    """Stream one chat completion; its latency, time to first token and token count."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=request, max_tokens=args.max_tokens, temperature=0, stream=True,
        logit_bias={str(eos_token_id): -100.0},  # a float: serve's `sequence_bias` refuses ints (5.17-5.24)
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            tokens += 1
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def round_of(port: int, model: str, clients: int, args, eos_token_id: int) -> dict:
    """`clients` threads, each sending `--requests-per-client` requests one after another."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S, http_client=openai.DefaultHttpxClient(trust_env=False))
    requests = [[messages(c * args.requests_per_client + r, args.images, args.image_px)
                 for r in range(args.requests_per_client)] for c in range(clients)]
    results, errors = [], []

    def client_thread(own: list):
        for request in own:
            try:
                results.append(one_request(client, model, request, args, eos_token_id))
            except Exception as error:  # counted and shown, never hidden in the averages
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client_thread, args=(own,)) for own in requests]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S * args.requests_per_client)
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients * args.requests_per_client} requests failed: {errors[:3]}")

    def quantile(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    latencies, ttfts = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {
        "requests": len(results), "wall_s": wall,
        "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50_s": quantile(latencies, 50), "latency_p99_s": quantile(latencies, 99),
        "ttft_p50_s": quantile(ttfts, 50), "ttft_p99_s": quantile(ttfts, 99),
    }


# ------------------------------------------------------------------------------------------------ the report
COLUMNS = [("requests_per_s", "req/s", "{:.3f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
           ("latency_p50_s", "p50 latency s", "{:.2f}"), ("latency_p99_s", "p99 latency s", "{:.2f}"),
           ("ttft_p50_s", "p50 TTFT s", "{:.2f}"), ("ttft_p99_s", "p99 TTFT s", "{:.2f}")]


def markdown(results: dict[str, dict[int, dict]], baseline: str = "stock") -> str:
    names = list(results)
    lines = ["| N | server | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for clients in next(iter(results.values())):
        for name in names:
            row = results[name][clients]
            lines.append(f"| {clients} | {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
        for name in names:
            if name == baseline or baseline not in results:
                continue
            ratios = [results[name][clients][key] / results[baseline][clients][key] for key, _, _ in COLUMNS]
            lines.append(f"| {clients} | ratio {name} / {baseline} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(bench_inference.SIZES))
    parser.add_argument("--clients", default="1,4,16", help="the concurrent client counts N, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--image-px", type=int, default=256, help="side of each random image sent")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16, help="llava-ext serve's --max-batch-size")
    parser.add_argument("--unbatched", action="store_true", help="also run llava-ext serve --max-batch-size 1")
    parser.add_argument("--servers", default=None, help="a subset of: stock,llava-ext (and 'llava-ext bs1')")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    if max(clients) > 256 or args.requests_per_client * max(clients) > 1024:
        parser.error("at most 256 clients and 1024 requests a round: this benchmark runs on loopback only")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, stock = Path(tmp) / "llava-ext", Path(tmp) / "stock"
        model = build_model(args.size)
        eos_token_id = model.config.text_config.eos_token_id
        save_checkpoint(model, checkpoint)
        del model
        export_checkpoint(checkpoint, stock, progress=False)
        commands = server_commands(checkpoint, stock, args)
        if args.servers:
            commands = {name: commands[name] for name in args.servers.split(",")}
        results: dict[str, dict[int, dict]] = {}
        for name, command in commands.items():
            model_id = command[command.index("serve") + 1]
            with running(command, Path(tmp) / f"{name.replace(' ', '-')}.log") as port:
                one = argparse.Namespace(**{**vars(args), "requests_per_client": 1})
                round_of(port, model_id, 1, one, eos_token_id)  # warm-up
                results[name] = {}
                for n in clients:
                    results[name][n] = round_of(port, model_id, n, args, eos_token_id)
                    print(f"{name} N={n}: {json.dumps(results[name][n])}", file=sys.stderr, flush=True)

    print(f"\nbench_serve: size {args.size}, {args.images} image(s) of {args.image_px} px a request, "
          f"{args.max_tokens} output tokens, {args.requests_per_client} request(s) per client, device {args.device}, "
          f"llava-ext --max-batch-size {args.max_batch_size}\n")
    print(markdown(results))
    if args.json:
        environment = bench_inference.environment(args.device)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "environment": environment, "results": results}, indent=2))


if __name__ == "__main__":
    main()
