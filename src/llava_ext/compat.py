"""Every transformers internal llava_ext leans on outside the files shipped with checkpoints, in one place.

transformers ships a minor release every few weeks and moves its internals in them. Each item here is one import,
constant or small function with a comment naming the releases that need what, so the next break is a one-file fix
and the floor and newest test sessions (`nox`) say at once where. Where an API differs between releases, the item
detects the feature (`hasattr`, `dataclasses.fields`, `inspect.signature`), never the version string.

The files copied next to checkpoints (`configuration_llava_ext.py`, `modeling_llava_ext.py`, `vision.py` and the
processor files) do not import this module: they use only transformers' stable public names and carry their own
feature checks, because they run on releases this module has never seen.

Tested releases: 5.17.0 (the declared floor), 5.20.2, 5.23.0 and 5.24.0 (the newest at the time of writing).
"""

import dataclasses

import transformers
from transformers import TrainingArguments

# CompileConfig, BaseStreamer: transformers.generation.{configuration_utils,streamers} on 5.17-5.24, re-exported by
# `transformers.generation` (not by the top-level package).
from transformers.generation import BaseStreamer, CompileConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

# AutoImageProcessor: on releases before 5.2x, `transformers.AutoImageProcessor` is a torchvision-gated placeholder
# when torchvision is missing; the module's class is the real one on 5.17-5.24, and a PIL image processor registers
# with it without torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

# load_image (path, URL or base64 -> PIL): transformers.image_utils on 5.17-5.24, not exported at top level.
from transformers.image_utils import load_image

# LengthGroupedSampler, TrainOutput, get_last_checkpoint: trainer_pt_utils / trainer_utils on 5.17-5.24.
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

# custom_object_save: copies an object's module and its relative imports next to a checkpoint (dynamic_module_utils,
# 5.17-5.24); `convert` uses it to write the code `save_pretrained` would.
from transformers.dynamic_module_utils import custom_object_save

# tqdm: transformers' wrapper honours its progress-bar switch (`disable_progress_bar`); utils.logging on 5.17-5.24.
from transformers.utils.logging import tqdm

# Conversion mappings: 5.0-5.24 load and save checkpoints through `transformers.conversion_mapping`; stock llava is
# saved in the 4.x key layout (`language_model.model.*`). A release without the module still reads that layout through
# `from_pretrained(key_mapping=...)`, which the model passes itself.
try:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
except ImportError:
    get_checkpoint_conversion_mapping = register_checkpoint_conversion_mapping = None

# The KV cache's name in forward/generate arguments and in outputs: `cache` from 5.24 (`past_key_values` still
# accepted with a FutureWarning until 5.40), `past_key_values` on 5.17-5.23.
CACHE_KWARG = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


# TrainingArguments' name for activation (gradient) checkpointing: `activation_checkpointing` where it exists (5.24; the
# old `gradient_checkpointing` warns until v6), `gradient_checkpointing` on 5.17. Recipes may say either.
CHECKPOINTING_ARGS = ("activation_checkpointing", "gradient_checkpointing")
CHECKPOINTING_ARG = next(name for name in CHECKPOINTING_ARGS if name in {f.name for f in dataclasses.fields(TrainingArguments)})

# Trainer hook: LlavaExtTrainer overrides `Trainer._get_train_sampler(self, train_dataset=None)` (that signature on
# 5.17-5.24; 4.x took no argument) so length-grouped batches read the dataset's cached lengths. A release that renames
# the hook would skip the override silently: tests/test_compat.py checks it exists with that argument.
TRAIN_SAMPLER_HOOK = "_get_train_sampler"

# `transformers serve` internals that llava_ext.serve reads; each is looked up by name (imported only when serving
# starts, since serve's own dependencies are an extra), so a release that moves one fails in tests/test_serve.py and
# tests/test_compat.py, not silently.
# - The `serve` command: `transformers.cli.serve.Serve`, a class whose `__init__` arguments are the command's options
#   (typer), on 5.17-5.24.
SERVE_MODULE = "transformers.cli.serve"
# - The model tables serve reads to load a model and to tell what a request may carry (transformers.models.auto.
#   modeling_auto on 5.17-5.24): `_load_model` checks the model type in the first, `get_model_modality` the class name
#   in both.
MODEL_TABLES_MODULE = "transformers.models.auto.modeling_auto"
SERVE_MODEL_TABLES = ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
# - `build_server(...) -> FastAPI`, imported from this module by `Serve.__init__` when the command runs (5.17-5.25).
SERVER_MODULE = "transformers.cli.serving.server"
# - `ModelLoader` (5.25): how serve loads models. From 5.25 each model runs in a process serve spawns, and so may
#   each API server (`--api-server-count`); a copy of the loader is pickled into each. `Serve.__init__` imports the
#   class from this module when the command runs. 5.17-5.24 have no such class and load in the server's own process.
MODEL_LOADER_MODULE = "transformers.cli.serving.model_manager"
# - How serve generates, where llava_ext's batching plugs in (`llava_ext.serve`): 5.17-5.24 run requests in the server's
#   process through `GenerationState.get_manager(model_id, use_cb) -> GenerateManager` (this module; `Serve.__init__`
#   imports `GenerationState` from it when the command runs). 5.25 runs them in the model's process through a
#   `GenerateRunner(model, processor, send_results)`, which `EngineClient.run_engine` looks up in MODEL_LOADER_MODULE.
SERVE_UTILS_MODULE = "transformers.cli.serving.utils"


def auto_model_classes_for(model_type: str) -> list[type]:
    """The top-level `AutoModel*` classes under which transformers registers `model_type` in the installed release.

    Each Auto class keeps its table in `_model_mapping._model_mapping` (config model type -> class name) on 5.17-5.24;
    5.2x added `AutoModelForMultimodalLM` for llava. Detected, not listed, so a new table is picked up as it appears.
    """
    found = []
    for name in sorted(dir(transformers)):
        if not name.startswith("AutoModel"):
            continue
        table = getattr(getattr(getattr(transformers, name, None), "_model_mapping", None), "_model_mapping", None)
        if isinstance(table, dict) and model_type in table:
            found.append(getattr(transformers, name))
    return found


def register_stock_checkpoint_layout(ours_to_stock: dict[str, str]) -> bool:
    """Give each of our model types / class names the conversion mapping of its stock twin.

    Then a llava_ext model made here (training, `convert`) saves the stock llava key layout, as transformers' own LLaVA
    does. Returns False where the release has no conversion mappings (the files then use our module names).
    """
    if register_checkpoint_conversion_mapping is None:
        return False
    for ours, stock in ours_to_stock.items():
        mapping = get_checkpoint_conversion_mapping(stock)
        if mapping is not None:
            register_checkpoint_conversion_mapping(ours, mapping, overwrite=True)
    return True


def default_progress_callback() -> type:
    """The callback `Trainer.__init__` adds to draw its progress bar unless `disable_tqdm` (then `PrinterCallback`).

    `transformers.trainer.DEFAULT_PROGRESS_CALLBACK` on 5.17-5.25: `ProgressCallback`, or `NotebookProgressCallback` in
    a notebook. Imported when asked for, since `import llava_ext` does not load `Trainer`.
    """
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK

    return DEFAULT_PROGRESS_CALLBACK


def keep_used_weight_conversions(model) -> None:
    """Keep only the key renamings that matched the checkpoint, for save_pretrained to reverse.

    transformers 5.24 does so after a normal load (core_model_loading.py) but keeps every candidate after a DeepSpeed
    ZeRO-3 load (integrations/deepspeed.py), which then renames keys twice on save (`language_model.model.model.*`).
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not hasattr(c, "was_used") or c.was_used()]


__all__ = [
    "CACHE_KWARG",
    "CHECKPOINTING_ARG",
    "CHECKPOINTING_ARGS",
    "MODEL_TABLES_MODULE",
    "SERVER_MODULE",
    "SERVE_UTILS_MODULE",
    "SERVE_MODEL_TABLES",
    "SERVE_MODULE",
    "TRAIN_SAMPLER_HOOK",
    "BaseStreamer",
    "AutoImageProcessor",
    "CompileConfig",
    "LengthGroupedSampler",
    "TrainOutput",
    "auto_model_classes_for",
    "custom_object_save",
    "default_progress_callback",
    "get_last_checkpoint",
    "keep_used_weight_conversions",
    "load_image",
    "register_stock_checkpoint_layout",
    "tqdm",
]
