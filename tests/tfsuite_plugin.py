"""pytest plugin for `run_transformers_suite.py`: runs transformers' own llava_next / llava_onevision tests with their
classes swapped for llava_ext's.

The runner copies this file next to the extracted transformers tests as their `conftest.py`. Before the test modules
are imported it rebinds the names they take from `transformers` (`LlavaNextConfig` -> `LlavaExtNextConfig`, ...) and
points the image-processing mixin's per-folder lookup at our processors. Tests that cannot apply to a plugin family
are skipped from `SKIPS`, each with its reason; nothing else is skipped here.
"""

import fnmatch
import importlib.util
import os

# As in tests/conftest.py: 5.25 turns hub kernels on in every from_pretrained and needs the `kernels` package for it.
if importlib.util.find_spec("kernels") is None and "USE_HUB_KERNELS" not in os.environ:
    os.environ["USE_HUB_KERNELS"] = "NO"

import pytest

import llava_ext

# transformers' public name -> ours. Image processors are not here: the tests find them per folder (see below).
CLASS_SWAPS = {
    "LlavaNextConfig": llava_ext.LlavaExtNextConfig,
    "LlavaNextModel": llava_ext.LlavaExtNextModel,
    "LlavaNextForConditionalGeneration": llava_ext.LlavaExtNextForConditionalGeneration,
    "LlavaNextProcessor": llava_ext.LlavaExtNextProcessor,
    "LlavaOnevisionConfig": llava_ext.LlavaExtOnevisionConfig,
    "LlavaOnevisionModel": llava_ext.LlavaExtOnevisionModel,
    "LlavaOnevisionForConditionalGeneration": llava_ext.LlavaExtOnevisionForConditionalGeneration,
    "LlavaOnevisionProcessor": llava_ext.LlavaExtOnevisionProcessor,
}

# tests/models/<folder> -> its image processors by backend, as transformers' IMAGE_PROCESSOR_MAPPING_NAMES lists them.
# Ours are PIL processors; the torchvision ("fast") backend has no llava_ext counterpart to swap in and torchvision
# does not run on the development machines, so that backend is left out (its tests skip, see SKIPS).
IMAGE_PROCESSOR_SWAPS = {
    "llava_next": {"pil": llava_ext.LlavaExtNextImageProcessor},
    "llava_onevision": {"pil": llava_ext.LlavaExtOnevisionImageProcessor},
}

_HUB = "downloads from the Hugging Face Hub (hf-internal-testing tokenizers / checkpoints); these runs are offline"
_TORCHVISION = "needs torchvision (the 'fast' processors), which does not work on this machine"
_TILES = (
    "deliberate divergence: llava_ext's anyres image processors refuse image_grid_pinpoints that are not multiples of "
    "the tile side (the model counts tiles by floor division, the processor cuts by ceiling, so image tokens would "
    "not match); these fixtures use 18/20-px tiles with the 336-px pinpoints (tests/test_image_processing_llava_ext_next.py "
    "pins the error)"
)

# (nodeid glob, reason). Matched against the node id relative to the extracted tests root.
SKIPS = [
    ("models/llava_next/test_processing_llava_next.py::*", _HUB),
    ("models/llava_onevision/test_processing_llava_onevision.py::*", _HUB),
    ("models/llava_onevision/test_video_processing_llava_onevision.py::*", _TORCHVISION),
    ("*::test_backends_equivalence*", _TORCHVISION),
    *(
        (f"models/{folder}/test_image_processing_{folder}.py::*::{test}", _TILES)
        for folder in ("llava_next", "llava_onevision")
        for test in (
            "test_call_numpy", "test_call_pil", "test_call_pytorch", "test_call_without_padding", "test_nested_input",
            "test_image_processor_from_and_save_pretrained", "test_image_processor_from_dict_with_kwargs",
            "test_image_processor_preprocess_arguments", "test_image_processor_properties",
            "test_image_processor_save_load_with_autoimageprocessor", "test_image_processor_to_json_file",
            "test_image_processor_to_json_string", "test_pad_for_patching",
        )  # fmt: skip
    ),
    ("*::test_fast_is_faster_than_slow", _TORCHVISION),
    ("*::test_can_compile_torchvision_backend", _TORCHVISION),
]


# Common modules call `direct_transformers_import`, which re-executes transformers/__init__.py and so puts a fresh
# module object at sys.modules["transformers"]; they are imported first, and the names swapped on the module left.
COMMON_MODULES = (
    "tests.test_configuration_common",
    "tests.test_pipeline_mixin",
    "tests.test_modeling_common",
    "tests.test_image_processing_common",
    "tests.test_processing_common",
)


def _swap_names():
    import importlib
    import sys

    for module in COMMON_MODULES:
        importlib.import_module(module)
    for name, cls in CLASS_SWAPS.items():
        setattr(sys.modules["transformers"], name, cls)


def _list_model_types():
    """Our model types in the common modules' copies of transformers' model tables (`MODEL_MAPPING_NAMES`, ...), in
    every table that lists the stock twin's class under its type.

    The mixins tell base models from generation models by those tables (`test_training` skips a base model, which
    has no loss; `test_inputs_embeds_matches_input_ids` runs only on one). `AutoModel.register` does not write into
    them, so without this our base models would be run as generation models and some tests would check nothing. The
    module-level names are rebound to extended copies: transformers' own tables stay as they are."""
    import sys

    stock_names = {name: cls.__name__ for name, cls in CLASS_SWAPS.items()}
    ours_by_type = {cls.config_class.model_type for cls in CLASS_SWAPS.values() if hasattr(cls, "config_class")}
    stock_types = {"llava_next": "llava_ext_next", "llava_onevision": "llava_ext_onevision"}
    assert set(stock_types.values()) <= ours_by_type, ours_by_type
    for module_name in COMMON_MODULES:
        module = sys.modules[module_name]
        for attr, table in list(vars(module).items()):
            if not (attr.endswith("_MAPPING_NAMES") and isinstance(table, dict)):
                continue
            extra = {
                ours: stock_names[table[stock]]
                for stock, ours in stock_types.items()
                if isinstance(table.get(stock), str) and table[stock] in stock_names
            }
            if extra:
                setattr(module, attr, {**table, **extra})


def _check_swapped(items):
    """Fails the run if a collected test module still holds one of transformers' classes under a swapped name."""
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        for name, cls in CLASS_SWAPS.items():
            if name in vars(module) and vars(module)[name] is not cls:
                raise pytest.UsageError(f"{module.__name__}.{name} is {vars(module)[name]!r}, not llava_ext's {cls!r}")


def _swap_image_processors():
    from tests import test_image_processing_common as common

    mapping = dict(common.IMAGE_PROCESSOR_MAPPING_NAMES)
    ours = {}
    for folder, backends in IMAGE_PROCESSOR_SWAPS.items():
        mapping[folder] = {backend: cls.__name__ for backend, cls in backends.items()}
        ours.update({cls.__name__: cls for cls in backends.values()})
    upstream_lookup = common.get_image_processor_class_from_name
    common.IMAGE_PROCESSOR_MAPPING_NAMES = mapping
    common.get_image_processor_class_from_name = lambda name: ours.get(name) or upstream_lookup(name)


def _alias_torchvision_only_modules():
    """The image-processing tests import `select_best_resolution` from the torchvision backend's module, which cannot
    be imported without torchvision; where it is missing, that module name resolves to a stand-in holding only the
    helper, taken from transformers.image_processing_utils where it is defined."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    import sys
    import types

    from transformers.image_processing_utils import select_best_resolution

    stand_in = types.ModuleType("transformers.models.llava_next.image_processing_llava_next")
    stand_in.select_best_resolution = select_best_resolution
    sys.modules[stand_in.__name__] = stand_in


def pytest_configure(config):
    _alias_torchvision_only_modules()
    _swap_names()
    _list_model_types()
    _swap_image_processors()
    for marker in ("flash_attn_test", "flash_attn_3_test", "torch_compile_test", "torch_export_test", "training_ci"):
        config.addinivalue_line("markers", f"{marker}: transformers' marker")


def pytest_collection_modifyitems(config, items):
    _check_swapped(items)
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        for pattern, reason in SKIPS:
            if fnmatch.fnmatchcase(nodeid, pattern):
                item.add_marker(pytest.mark.skip(reason=reason))
                break
