"""`llava-ext serve`: transformers' own OpenAI-compatible server on tiny llava_ext checkpoints, via the openai client.

The server runs in a subprocess on a free 127.0.0.1 port. The tiny random model's answers are arbitrary, so each served
greedy answer is checked against `model.generate` here on the same prompt: equal text means the served prompt, image
included, reached the model as the processor builds it.
"""

import base64
import contextlib
import http.client
import io
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import PIL.Image
import pytest
import torch
from conftest import HANG_GUARD_S, NUM_PATCHES, VOCAB_SIZE, build_tiny_tokenizer, tiny_llava_config

import llava_ext.cli
import llava_ext.serve
from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, LlavaExtImageProcessor, LlavaExtProcessor

MAX_TOKENS = 6
READY_TIMEOUT_S = REQUEST_TIMEOUT_S = HANG_GUARD_S  # hang guards only: start-up takes ~20-40 s on a busy 2-core CPU


def tiny_checkpoint(path: Path, **config_kwargs) -> tuple[LlavaExtForConditionalGeneration, LlavaExtProcessor]:
    torch.manual_seed(0)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config(**config_kwargs).to_dict())).eval()
    processor = LlavaExtProcessor(
        LlavaExtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        build_tiny_tokenizer(), patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(seed)).decode()


def suppressed_ids(processor) -> list[int]:
    """pad/BOS/EOS/unk/<image> and the ids past the tokenizer: the rest decode to one character each, never stop."""
    return [*range(5), *range(len(processor.tokenizer), VOCAB_SIZE)]


def local_answer(model, processor, messages: list[dict]) -> str:
    """Greedy `generate` on the processor's chat-template prompt, with the bias the requests send as `logit_bias`."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    bias = {(token,): -100.0 for token in suppressed_ids(processor)}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, sequence_bias=bias)
    generated = output[0, inputs["input_ids"].shape[1]:]
    assert len(generated) == MAX_TOKENS  # nothing that stops generation can win
    return processor.decode(generated, skip_special_tokens=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)  # no proxy from the environment
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextlib.contextmanager
def served(arguments: list[str], workdir: Path):
    """`llava-ext serve ARGUMENTS` in a subprocess on a free local port; yields an openai client, stops the server."""
    port = free_port()
    command = [sys.executable, "-m", "llava_ext.cli", "serve", *arguments,
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONUNBUFFERED": "1"}
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not is_healthy(port):
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        )
        yield client
        assert process.poll() is None, f"the server died:\n{log_path.read_text()[-4000:]}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@dataclass
class Served:
    client: openai.OpenAI
    checkpoint: Path
    model: LlavaExtForConditionalGeneration
    processor: LlavaExtProcessor

    def ask(self, messages: list[dict], **kwargs):
        """A greedy chat completion of MAX_TOKENS tokens that never stops early (as `local_answer`)."""
        return self.client.chat.completions.create(
            model=kwargs.pop("model", str(self.checkpoint)), messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            # floats: transformers serve turns logit_bias into `sequence_bias`, which refuses ints (5.17-5.24)
            logit_bias={str(token): -100.0 for token in suppressed_ids(self.processor)}, **kwargs,
        )


# ---------------------------------------------------------------------------------------------------------------
# One server, pinned to a llava_ext checkpoint (CLIP tower, vision_feature_layer=-2), with the installed llava_ext.


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    checkpoint = workdir / "checkpoint"
    model, processor = tiny_checkpoint(checkpoint)
    (workdir / "image.png").write_bytes(png(1))
    (workdir / "not-an-image.png").write_text("these bytes are not a PNG")
    with served([str(checkpoint)], workdir) as client:
        yield Served(client, checkpoint, model, processor)


def user(*parts) -> dict:
    """An OpenAI user message: strings are text parts, ("image", url) pairs image_url parts."""
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": part[1]}} if isinstance(part, tuple)
        else {"type": "text", "text": part}
        for part in parts
    ]}


def processor_user(*parts) -> dict:
    """The same message as the processor's chat template takes it."""
    return {"role": "user", "content": [
        {"type": "image", "url": part[1]} if isinstance(part, tuple) else {"type": "text", "text": part}
        for part in parts
    ]}


def test_chat_completion_with_a_data_url_image_equals_local_generate(server):
    image = ("image", data_url(0))
    response = server.ask([user(image, "What is in the image?")])
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert response.usage.completion_tokens == MAX_TOKENS
    expected = local_answer(server.model, server.processor, [processor_user(image, "What is in the image?")])
    assert choice.message.content == expected and len(expected) == MAX_TOKENS


def test_streamed_chat_with_an_image_path_equals_local_generate(server):
    image = ("image", str(server.checkpoint.parent / "image.png"))
    chunks = list(server.ask([user("Describe", image)], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]
    # A server-sent event stream, ending with its finish reason; how many tokens a chunk carries is the server's
    # choice: from 5.25 the model runs in a process of its own and a busy machine's API server sends what has come.
    assert len(chunks) >= 2
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert "".join(pieces) == local_answer(server.model, server.processor, [processor_user("Describe", image)])


def test_two_turn_conversation_equals_local_generate(server):
    image = ("image", data_url(2))
    answer = server.ask([user(image, "Colour?")]).choices[0].message.content
    response = server.ask([user(image, "Colour?"), {"role": "assistant", "content": answer}, user("And the shape?")])
    expected = local_answer(server.model, server.processor, [
        processor_user(image, "Colour?"),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        processor_user("And the shape?"),
    ])
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens > NUM_PATCHES + len("Colour?" + answer + "And the shape?")


def test_unreadable_image_is_a_400_and_the_server_stays_up(server):
    bad = ("image", str(server.checkpoint.parent / "not-an-image.png"))
    with pytest.raises(openai.BadRequestError, match=r"Image 0 \('.*not-an-image\.png'\) could not be read") as error:
        server.ask([user(bad, "Hi")])
    assert error.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match=r"Image 0 \('.*missing\.png'\) is not an existing file"):
        server.ask([user(("image", str(server.checkpoint.parent / "missing.png")))])
    response = server.ask([user(("image", data_url(3)), "Hi")])
    assert response.choices[0].finish_reason == "length" and response.choices[0].message.content


def test_a_pinned_server_refuses_another_model(server):
    with pytest.raises(openai.BadRequestError) as error:
        server.ask([user("Hi")], model="some/other-model")
    body = error.value.response.json()  # FastAPI's {"detail"} up to 5.24; from 5.25 a ValueError, answered OpenAI-style
    assert "pinned" in (body["detail"] if "detail" in body else body["error"]["message"])


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint the stock llava layout cannot express (vision_feature_layer=0: the tower's embeddings), served with
# `--trust-remote-code` passed through as `transformers serve CKPT --trust-remote-code` is usually run. transformers
# still prefers the registered llava_ext classes to the code saved beside the checkpoint.


def test_vision_feature_layer_0_checkpoint_with_remote_code(tmp_path):
    checkpoint = tmp_path / "layer0"
    model, processor = tiny_checkpoint(checkpoint, vision_feature_layer=0)
    assert model.config.vision_feature_layer == 0
    image = ("image", data_url(4))
    with served([str(checkpoint), "--trust-remote-code", "--log-level", "info"], tmp_path) as client:
        response = Served(client, checkpoint, model, processor).ask([user(image, "What?")])
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == local_answer(model, processor, [processor_user(image, "What?")])


# ---------------------------------------------------------------------------------------------------------------
# The command and its errors, without a server.


@pytest.fixture
def serve_globals(monkeypatch):
    """What `enable_transformers_serve` changes in this process (serve's tables, `build_server`, its
    `GenerationState` or from 5.25 its `ModelLoader` and `GenerateRunner`), restored after."""
    from transformers.cli.serving import server as server_module
    from transformers.models.auto import modeling_auto

    for name in llava_ext.compat.SERVE_MODEL_TABLES:
        table = getattr(modeling_auto, name)
        monkeypatch.setattr(modeling_auto, name, type(table)(table))
    monkeypatch.setattr(server_module, "build_server", server_module.build_server)
    from transformers.cli.serving import model_manager

    if hasattr(model_manager, "ModelLoader"):  # 5.25+
        monkeypatch.setattr(model_manager, "ModelLoader", model_manager.ModelLoader)
        monkeypatch.setattr(model_manager, "GenerateRunner", model_manager.GenerateRunner)
    from transformers.cli.serving import utils

    monkeypatch.setattr(utils, "GenerationState", utils.GenerationState)
    monkeypatch.setattr(llava_ext.serve, "_batch_settings", llava_ext.serve._batch_settings)
    return modeling_auto, server_module


def test_help_is_transformers_serve_help_ending_with_an_example(capsys, serve_globals):
    with pytest.raises(SystemExit) as exit:
        llava_ext.cli.main(["serve", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: llava-ext serve [OPTIONS]")
    for option in ("--port", "--host", "--trust-remote-code", "--device", "--dtype", "--continuous-batching"):
        assert option in out
    assert out.strip().splitlines()[-1].strip().startswith("example: llava-ext serve ")


def test_options_pass_through_in_any_order():
    parser = llava_ext.cli.build_parser()
    args = parser.parse_args(["serve", "--port", "9000", "ckpt", "--trust-remote-code", "-h"])
    assert args.serve_args == ["--port", "9000", "ckpt", "--trust-remote-code", "-h"]


def test_missing_serving_packages_are_named(monkeypatch):
    find_spec = llava_ext.serve.importlib.util.find_spec
    monkeypatch.setattr(llava_ext.serve.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("fastapi", "uvicorn") else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"needs fastapi, uvicorn, which are not installed; "
                                          r"pip install 'llava-ext\[serve\]'"):
        llava_ext.serve.transformers_serve_command()
    with pytest.raises(SystemExit, match=r"^llava-ext serve: error: transformers serve needs fastapi, uvicorn"):
        llava_ext.cli.main(["serve", "--help"])  # the CLI says it in one line, without a traceback


def test_a_release_without_transformers_serve_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.cli.serve", None)  # `import` now raises ImportError
    with pytest.raises(ImportError, match=r"has no `transformers serve`.*transformers 5\.17 to 5\.25"):
        llava_ext.serve.transformers_serve_command()


def serve_modality(model):
    """What serve takes `model` for: ModelManager.get_model_modality(model) up to 5.24 (a ValueError for an unknown
    one), ModelLoader.get_model_modality(config) from 5.25 (None for an unknown one)."""
    from transformers.cli.serving import model_manager

    if hasattr(model_manager.ModelManager, "get_model_modality"):
        try:
            return model_manager.ModelManager.get_model_modality(model)
        except ValueError as error:
            assert "Unknown modality" in str(error)
            return None
    return model_manager.ModelLoader.get_model_modality(model.config)


def test_enable_lists_llava_ext_beside_llava_once(serve_globals):
    from transformers import LlavaForConditionalGeneration
    from transformers.cli.serving.utils import Modality

    modeling_auto, server_module = serve_globals
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict()))
    assert serve_modality(model) is None  # what transformers serve does on its own

    llava_ext.serve.enable_transformers_serve()
    wrapped = server_module.build_server
    llava_ext.serve.enable_transformers_serve()
    assert server_module.build_server is wrapped  # not wrapped twice
    assert serve_modality(model) == serve_modality(LlavaForConditionalGeneration(tiny_llava_config()))  # as stock
    assert serve_modality(model) in (Modality.VLM, Modality.MULTIMODAL)
    assert modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES["llava_ext"] == "LlavaExtForConditionalGeneration"


def test_serves_loader_brings_llava_ext_into_the_processes_serve_spawns(serve_globals, tmp_path):
    """5.25+ loads models in spawned processes: unpickling serve's loader there imports and enables llava_ext."""
    from transformers.cli.serving import model_manager

    if not hasattr(model_manager, "ModelLoader"):
        pytest.skip("this transformers serve loads models in its own process (no ModelLoader)")
    llava_ext.serve.enable_transformers_serve()
    loader = model_manager.ModelLoader(device="cpu")  # as Serve.__init__ builds it, once enabled
    script = (
        "import pickle, sys\n"
        "loader = pickle.loads(sys.stdin.buffer.read())\n"
        "from transformers.models.auto import modeling_auto\n"
        "print(type(loader).__mro__[1].__name__, 'llava_ext' in sys.modules, loader.device,\n"
        "      modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.get('llava_ext'))\n"
    )
    completed = subprocess.run(  # a fresh interpreter, as multiprocessing's spawn starts one
        [sys.executable, "-c", script], input=pickle.dumps(loader), capture_output=True, timeout=HANG_GUARD_S,
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    last = completed.stdout.decode().strip().splitlines()[-1]
    assert last == "ModelLoader True cpu LlavaExtForConditionalGeneration"
