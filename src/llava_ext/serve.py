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
`generation_config`) with HTTP 400 and the error's message instead of a bare 500. Every other option and behaviour is
transformers serve's own.
"""

import functools
import importlib
import importlib.util
import logging

import transformers

from .compat import MODEL_LOADER_MODULE, MODEL_TABLES_MODULE, SERVE_MODEL_TABLES, SERVE_MODULE, SERVER_MODULE
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
    app.command(name="serve", epilog=epilog)(Serve)
    return typer.main.get_command(app)


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


def _answer_value_errors_with_400() -> None:
    """Wrap serve's `build_server` so the app it builds maps a `ValueError` raised by a request to HTTP 400."""
    server_module = importlib.import_module(SERVER_MODULE)
    build_server = server_module.build_server
    if getattr(build_server, "_llava_ext_wrapped", False):
        return

    @functools.wraps(build_server)
    def build_server_answering_400(*args, **kwargs):
        app = build_server(*args, **kwargs)
        app.add_exception_handler(ValueError, _bad_request)
        return app

    build_server_answering_400._llava_ext_wrapped = True
    server_module.build_server = build_server_answering_400


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
        imports llava_ext (this module) and enables serve there before anything loads."""

        def __setstate__(self, state: dict) -> None:
            enable_transformers_serve()
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


def enable_transformers_serve() -> None:
    """Let `transformers serve`, run in this process, serve llava_ext checkpoints; safe to call more than once.

    Lists llava_ext in serve's model tables wherever transformers lists its llava (serve then loads the model through
    `AutoModelForMultimodalLM`, where `import llava_ext` registered it, and keeps a request's images), and makes the
    server answer a request that raises `ValueError` with HTTP 400 and the message, not 500; from 5.25, the same in the
    processes serve spawns (the model's, the API servers). Call it before the server starts; for Python use:

    ```python
    >>> from transformers.cli.serve import Serve
    >>> enable_transformers_serve()
    >>> Serve("path/to/checkpoint", port=8000)  # blocks; `transformers serve`'s options as keyword arguments
    ```
    """
    _list_llava_ext_where_llava_is()
    _answer_value_errors_with_400()
    _load_in_spawned_processes_too()


__all__ = ["SERVE_REQUIREMENTS", "enable_transformers_serve", "transformers_serve_command"]
