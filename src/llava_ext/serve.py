"""Serving llava_ext checkpoints with transformers' own OpenAI-compatible server, `transformers serve`.

Nothing here is a server: `enable_transformers_serve()` teaches transformers' serving stack about llava_ext, and
`transformers_serve_command()` hands back transformers' own `serve` command to run. A chat request's path through serve,
and where a stock `transformers serve CKPT` fails a llava_ext checkpoint (read in `transformers/cli/serving/`, 5.17 to
5.25):

    POST /v1/chat/completions
      -> ModelManager._load_model:     model type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES?
                                          yes: AutoModelForMultimodalLM.from_pretrained  (llava_ext registers there)
                                          no:  getattr(transformers, config.architectures[0])  -> AttributeError for
                                               "LlavaExtForConditionalGeneration", at start-up with a pinned model
      -> ModelManager.get_model_modality: class name in the multimodal-LM or image-text-to-text table?
                                          no:  ValueError("Unknown modality ...") -> HTTP 500 on every request
      -> processor.apply_chat_template(..., tokenize=True) loads the images; a bad one raises ValueError -> HTTP 500

From 5.25 serve loads each model in a process of its own, started with `spawn` (and with `--api-server-count N`, N
API servers too): a fresh interpreter that has not imported llava_ext, whose `AutoProcessor` then refuses the
checkpoint's code ("contains custom code which must be executed"). The server's `ModelLoader`, pickled into each of
those processes, is llava_ext's subclass there, and unpickling it imports llava_ext and enables serve in that process.

`enable_transformers_serve()` lists llava_ext in the tables where transformers lists its own llava, so serve loads and
treats a llava_ext checkpoint exactly as it does a stock LLaVA one, with the installed llava_ext classes (transformers
prefers registered classes to a checkpoint's code, so `--trust-remote-code` is not needed and runs none of it), and
answers a request that fails with a `ValueError` (an unreadable image, an image-token mismatch, a bad
`generation_config`) with HTTP 400 and the error's message instead of a bare 500.

It also batches concurrent requests, which transformers serve runs one at a time for image-text models (its continuous
batching is for LLMs only): each model's generation goes through a `batching.BatchingGenerator`, in the server's
process up to 5.24 (serve's `GenerationState` hands out a `GenerateManager` subclass) and in the model's process from
5.25 (a `GenerateRunner` subclass). `--max-batch-size` and `--batch-wait-ms` set it; `--max-batch-size 1` is serve's
one-at-a-time behaviour. Every other option and behaviour is transformers serve's own.
"""

import asyncio
import functools
import importlib
import importlib.util
import logging
import threading

import torch
import transformers

from .batching import BatchingGenerator, BatchSettings, GenerationRequest
from .compat import (
    MODEL_LOADER_MODULE, MODEL_TABLES_MODULE, SERVE_MODEL_TABLES, SERVE_MODULE, SERVE_UTILS_MODULE, SERVER_MODULE,
)
from .configuration_llava_ext import LlavaExtConfig
from .modeling_llava_ext import LlavaExtForConditionalGeneration

logger = logging.getLogger(__name__)

# What `transformers serve` needs beyond transformers itself: its `serving` extra (5.17-5.24) less torch and
# accelerate, which llava_ext requires anyway. `is_serve_available()` checks the first four.
SERVE_REQUIREMENTS = ("fastapi", "uvicorn", "pydantic", "openai", "starlette")


def _missing_requirements() -> list[str]:
    return [name for name in SERVE_REQUIREMENTS if importlib.util.find_spec(name) is None]


def transformers_serve_command(epilog: str | None = None):
    """transformers' own `serve` command (a click command built by typer), ready to run with `.main(args=...)`.

    Args:
        epilog (`str`, *optional*): text shown after the options in `--help`.

    Returns:
        `click.Command` whose options are exactly `transformers serve`'s in the installed release.

    Raises:
        ImportError: the installed transformers has no `transformers serve`, or its serving packages are missing.
    """
    try:
        serve_module = importlib.import_module(SERVE_MODULE)
        Serve = serve_module.Serve
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"transformers {transformers.__version__} has no `transformers serve` ({SERVE_MODULE}.Serve: {error}); "
            "llava-ext serve runs transformers' own server, found in transformers 5.17 to 5.25 (tested): "
            "pip install 'transformers>=5.17,<6'."
        ) from error
    missing = _missing_requirements()
    if missing:
        raise ImportError(
            f"transformers serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            "installed; pip install 'llava-ext[serve]' (or transformers[serving])."
        )
    import typer

    # One command on its own, registered as transformers registers it (`app.command(name="serve")(Serve)`), with its
    # plain-click help (`rich_markup_mode=None`, as `transformers serve --help` prints it).
    app = typer.Typer(
        add_completion=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    )
    app.command(name="serve", epilog=epilog)(_with_batching_options(Serve))
    return typer.main.get_command(app)


def _with_batching_options(Serve: type):
    """`Serve`, with llava_ext's batching options after its own: enables serve with them, then runs it."""
    import inspect
    from typing import Annotated

    import typer

    defaults = BatchSettings()
    options = [
        inspect.Parameter("max_batch_size", inspect.Parameter.KEYWORD_ONLY, default=defaults.max_batch_size,
                          annotation=Annotated[int, typer.Option(min=1, help=(
                              "llava-ext: the most concurrent requests in one batched generate(); 1 runs them one "
                              "at a time, as transformers serve does."))]),
        inspect.Parameter("batch_wait_ms", inspect.Parameter.KEYWORD_ONLY, default=defaults.max_wait_s * 1000,
                          annotation=Annotated[float, typer.Option(min=0, help=(
                              "llava-ext: how long a request waits for others to share its batch."))]),
    ]

    def serve(*args, max_batch_size: int, batch_wait_ms: float, **serve_options):
        enable_transformers_serve(BatchSettings(max_batch_size, batch_wait_ms / 1000))
        return Serve(*args, **serve_options)

    serve.__signature__ = inspect.Signature([*inspect.signature(Serve).parameters.values(), *options])
    serve.__annotations__ = {}
    serve.__doc__ = Serve.__doc__
    return serve


def _list_llava_ext_where_llava_is() -> None:
    """Name llava_ext in serve's model tables wherever transformers names its own llava."""
    tables = importlib.import_module(MODEL_TABLES_MODULE)
    for name in SERVE_MODEL_TABLES:
        table = getattr(tables, name, None)
        if table is not None and "llava" in table:
            table.setdefault(LlavaExtConfig.model_type, LlavaExtForConditionalGeneration.__name__)


async def _bad_request(request, error: ValueError):
    """An OpenAI-style 400 answer (`openai.BadRequestError` on the client) carrying the error's message."""
    from fastapi.responses import JSONResponse

    logger.warning("%s %s answered 400: %s", request.method, request.url.path, error)
    body = {"message": str(error), "type": "invalid_request_error", "param": None, "code": None}
    return JSONResponse({"error": body}, status_code=400)


async def _image_too_large(request, error: Exception):
    """PIL refuses to decode an image of more pixels than `PIL.Image.MAX_IMAGE_PIXELS` (a decompression bomb)."""
    return await _bad_request(request, ValueError(
        f"An image is too large to decode ({error}); resize it first: the processor resizes every image to the "
        "model's input size anyway."
    ))


def _answer_value_errors_with_400() -> None:
    """Wrap serve's `build_server` so the app it builds maps a `ValueError` raised by a request to HTTP 400."""
    server_module = importlib.import_module(SERVER_MODULE)
    build_server = server_module.build_server
    if getattr(build_server, "_llava_ext_wrapped", False):
        return

    @functools.wraps(build_server)
    def build_server_answering_400(*args, **kwargs):
        from PIL import Image

        app = build_server(*args, **kwargs)
        app.add_exception_handler(ValueError, _bad_request)
        app.add_exception_handler(Image.DecompressionBombError, _image_too_large)
        return app

    build_server_answering_400._llava_ext_wrapped = True
    server_module.build_server = build_server_answering_400


# How the server being set up batches (`enable_transformers_serve`); None: one request at a time
_batch_settings: BatchSettings | None = None


def _pad_token_id(model, processor) -> int:
    """The id left padding uses: the tokenizer's pad token, else the model's, else its end of sequence."""
    for candidate in (getattr(getattr(processor, "tokenizer", processor), "pad_token_id", None),
                      model.generation_config.pad_token_id, model.generation_config.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return candidate
    return 0


@functools.cache
def _batching_manager_classes() -> tuple[type, type] | None:
    """serve's `GenerateManager` and `GenerationState` (5.17-5.24) as subclasses that batch; None where absent."""
    utils = importlib.import_module(SERVE_UTILS_MODULE)
    if not hasattr(utils, "GenerateManager") or not hasattr(utils.GenerationState, "get_manager"):
        return None

    class BatchingGenerateManager(utils.GenerateManager):
        """serve's sequential `GenerateManager`, whose chat and completion requests run in a `BatchingGenerator`
        (other work, `submit`, still runs on its inference thread)."""

        def __init__(self, settings: BatchSettings):
            super().__init__()
            self.settings, self._generator, self._lock = settings, None, threading.Lock()

        def generator(self, model, processor) -> BatchingGenerator:
            with self._lock:
                if self._generator is None or self._generator.model is not model:
                    self._generator = BatchingGenerator(
                        model, _pad_token_id(model, processor), self.settings, tokenizer=processor
                    )
                return self._generator

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            loop = asyncio.get_running_loop()
            output: asyncio.Queue = asyncio.Queue()
            tokenizer = getattr(processor, "tokenizer", processor)._tokenizer  # the Rust tokenizer, as serve's own
            streamer = utils.DirectStreamer(tokenizer, loop, output, response_parser=response_parser)
            streamer.put(inputs["input_ids"])  # the prompt, which the streamer skips as it does generate's

            def on_finish(result) -> None:
                if isinstance(result, Exception):
                    loop.call_soon_threadsafe(output.put_nowait, utils._StreamError(str(result)))
                elif result is None:  # cancelled: the client has gone
                    loop.call_soon_threadsafe(output.put_nowait, None)
                else:
                    streamer.end()

            self.generator(model, processor).submit(GenerationRequest(
                dict(inputs), {"generation_config": gen_config}, on_finish,
                on_token=lambda token: streamer.put(torch.tensor([token])),  # raises once the client has gone
            ))
            return output, streamer

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            loop = asyncio.get_running_loop()
            answer = loop.create_future()

            def on_finish(result) -> None:
                loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(result))

            generator = self.generator(model, processor)
            request = generator.submit(GenerationRequest(dict(inputs), {"generation_config": gen_config}, on_finish))
            try:
                result = await answer
            except asyncio.CancelledError:
                generator.cancel(request)
                raise
            if isinstance(result, Exception):
                raise result
            text = processor.decode(result, skip_special_tokens=True)
            return text, inputs["input_ids"].shape[-1], torch.tensor(result, dtype=torch.long)

    class BatchingGenerationState(utils.GenerationState):
        """serve's `GenerationState`, handing out `BatchingGenerateManager`s where it would sequential managers."""

        def get_manager(self, model_id: str, use_cb: bool = False):
            if use_cb:
                return super().get_manager(model_id, use_cb=True)
            managers = self.__dict__.setdefault("_llava_ext_managers", {})
            if model_id not in managers:
                managers[model_id] = BatchingGenerateManager(self._llava_ext_batching)
            return managers[model_id]

    return BatchingGenerateManager, BatchingGenerationState


@functools.cache
def _batching_runner_class() -> type | None:
    """serve's `GenerateRunner` (5.25+, in the model's process) as a subclass that batches; None before."""
    runner = getattr(importlib.import_module(SERVE_UTILS_MODULE), "GenerateRunner", None)
    if runner is None:
        return None

    class BatchingGenerateRunner(runner):
        """serve's `GenerateRunner`, whose text generations run in a `BatchingGenerator`; submitted functions still
        run one at a time on its thread."""

        settings = BatchSettings()

        def __init__(self, model, processor, send_results):
            super().__init__(model, processor, send_results)
            self.batching = BatchingGenerator(model, _pad_token_id(model, processor), self.settings, processor)
            self.batched: dict[int, GenerationRequest] = {}

        def generate(self, request_id: int, inputs: dict, generation_kwargs: dict, stream: bool) -> None:
            def on_token(token: int) -> None:
                self.count_tokens(generated=1)
                self.send_results([request_id], [token], [])

            def on_finish(result) -> None:
                with self.lock:
                    self.batched.pop(request_id, None)
                if isinstance(result, Exception):  # crosses to the API server as text; a ValueError stays one (400)
                    kind = ValueError if isinstance(result, ValueError) else RuntimeError
                    result = kind(str(result) if kind is ValueError else f"{type(result).__name__}: {result}")
                elif stream:  # its tokens went out as they came
                    result = None
                elif result is not None:
                    self.count_tokens(generated=len(result))
                self.send_results([], [], [(request_id, result)])

            request = GenerationRequest(dict(inputs), dict(generation_kwargs), on_finish, on_token if stream else None)
            with self.lock:
                self.batched[request_id] = request
            try:
                self.batching.submit(request)  # a ValueError (prompt too long) answers the request with it
            except ValueError:
                with self.lock:
                    self.batched.pop(request_id, None)
                raise
            self.count_tokens(prompt=request.prompt_length)

        def cancel(self, request_id: int) -> None:
            with self.lock:
                request = self.batched.get(request_id)
            if request is None:
                super().cancel(request_id)
            else:
                BatchingGenerator.cancel(request)

        def state(self) -> tuple[int, int, str]:
            running, waiting, details = super().state()
            return running + self.batching.running, waiting + self.batching.waiting, details

    return BatchingGenerateRunner


def _batch_requests(settings: BatchSettings | None) -> None:
    """Make serve generate through a `BatchingGenerator` with `settings` (None: serve's own one-at-a-time)."""
    global _batch_settings
    _batch_settings = settings
    utils, model_manager = importlib.import_module(SERVE_UTILS_MODULE), importlib.import_module(MODEL_LOADER_MODULE)
    manager_classes, runner_class = _batching_manager_classes(), _batching_runner_class()
    if manager_classes is not None:  # 5.17-5.24: `Serve.__init__` builds its GenerationState from this module's name
        state_class = manager_classes[1]
        state_class._llava_ext_batching = settings
        stock = state_class.__mro__[1]
        utils.GenerationState = state_class if settings is not None else stock
    if runner_class is not None:  # 5.25+: `run_engine`, in the model's process, builds its runner by this name
        runner_class.settings = settings or BatchSettings()
        model_manager.GenerateRunner = runner_class if settings is not None else runner_class.__mro__[1]


@functools.cache
def _model_loader_class() -> type | None:
    """serve's `ModelLoader` (5.25+) as a subclass that brings llava_ext into the processes serve spawns; None before."""
    try:
        base = getattr(importlib.import_module(MODEL_LOADER_MODULE), "ModelLoader", None)
    except ImportError:  # a release whose serving stack is laid out otherwise has no loader to pickle either
        base = None
    if base is None:
        return None

    class LlavaExtModelLoader(base):
        """transformers serve's `ModelLoader`; a copy unpickled in a spawned process (the model's, an API server)
        imports llava_ext (this module) and enables serve there, batching as here, before anything loads."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.llava_ext_batching = _batch_settings

        def __setstate__(self, state: dict) -> None:
            enable_transformers_serve(state.get("llava_ext_batching"))
            self.__dict__.update(state)

    # pickle records a class by module and qualified name: this module's `__getattr__` builds it in the new process
    LlavaExtModelLoader.__module__, LlavaExtModelLoader.__qualname__ = __name__, LlavaExtModelLoader.__name__
    return LlavaExtModelLoader


def __getattr__(name: str):
    if name == "LlavaExtModelLoader" and _model_loader_class() is not None:
        return _model_loader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_in_spawned_processes_too() -> None:
    """Make serve (5.25+) build its `ModelLoader` from llava_ext's subclass; nothing on releases without one."""
    loader_class = _model_loader_class()
    if loader_class is not None:
        importlib.import_module(MODEL_LOADER_MODULE).ModelLoader = loader_class


def enable_transformers_serve(batching: BatchSettings | None = BatchSettings()) -> None:
    """Let `transformers serve`, run in this process, serve llava_ext checkpoints, batching concurrent requests; safe
    to call more than once (the last call's `batching` holds).

    Lists llava_ext in serve's model tables wherever transformers lists its llava (serve then loads the model through
    `AutoModelForMultimodalLM`, where `import llava_ext` registered it, and keeps a request's images), makes the
    server answer a request that raises `ValueError` (or sends an image too large to decode) with HTTP 400 and the
    message, not 500, and runs chat and completion requests through a `BatchingGenerator`; from 5.25, the same in the
    processes serve spawns (the model's, the API servers). Call it before the server starts; for Python use:

    ```python
    >>> from transformers.cli.serve import Serve
    >>> enable_transformers_serve(BatchSettings(max_batch_size=16))
    >>> Serve("path/to/checkpoint", port=8000)  # blocks; `transformers serve`'s options as keyword arguments
    ```

    Args:
        batching (`BatchSettings`, *optional*): how to batch concurrent requests; `None` runs them one at a time, as
            transformers serve does. Requests that continuous batching serves (`--continuous-batching`, LLMs) keep it.
    """
    _list_llava_ext_where_llava_is()
    _answer_value_errors_with_400()
    _batch_requests(batching)
    _load_in_spawned_processes_too()


__all__ = ["SERVE_REQUIREMENTS", "BatchSettings", "enable_transformers_serve", "transformers_serve_command"]
