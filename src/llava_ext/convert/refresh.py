"""Refresh the code shipped inside a llava_ext checkpoint to the installed llava_ext, leaving the weights alone.

A checkpoint carries copies of our modules for `trust_remote_code=True`, and code saved by an older llava_ext can
break on a newer transformers. `refresh_checkpoint_code` rewrites only those modules and the `auto_map` entries that
name them; every other file (weights, tokenizer, chat template, generation config) is carried over as it is, and no
tensor is ever parsed.

In place, the new directory is built beside the old one and swapped in with renames (`io.atomic_directory`), so the
path holds the old checkpoint or the complete new one, never a mix (and, for the instant between the two renames,
nothing); unchanged files are hard links, so the weights are neither copied nor rewritten:

    ckpt/                         .ckpt.XXXX.partial/                  ckpt/ (after the swap)
      model.safetensors  --link-->  model.safetensors        rename      model.safetensors    (same inode)
      tokenizer.json     --link-->  tokenizer.json           ------>     tokenizer.json       (same inode)
      modeling_*.py (old)           modeling_*.py (installed)            modeling_*.py (installed)
      config.json (old auto_map)    config.json (new auto_map)           config.json (new auto_map)
"""

import functools
import importlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from transformers import logging

from .. import __version__
from ..compat import custom_object_save
from ..image_processing_llava_ext import LlavaExtImageProcessor
from ..image_processing_llava_ext_next import LlavaExtNextImageProcessor
from ..image_processing_llava_ext_onevision import LlavaExtOnevisionImageProcessor
from ..modeling_llava_ext import AUTO_MAP
from ..modeling_llava_ext_next import NEXT_AUTO_MAP
from ..modeling_llava_ext_onevision import ONEVISION_AUTO_MAP
from ..processing_llava_ext import LlavaExtProcessor
from ..processing_llava_ext_next import LlavaExtNextProcessor
from ..processing_llava_ext_onevision import LlavaExtOnevisionProcessor
from .hub import push_to_hub
from .io import atomic_directory, check_output_free, clean_interrupted_writes, read_json, resolve_source

logger = logging.get_logger(__name__)

# Every module name a llava_ext release has shipped next to a checkpoint. Only these are ever removed (when the
# installed code no longer needs them); any other file in the checkpoint is carried over untouched.
SHIPPED_MODULES = (
    "configuration_llava_ext", "modeling_llava_ext", "vision", "processing_llava_ext", "image_processing_llava_ext",
    "anyres", "processing_llava_ext_next", "image_processing_llava_ext_next", "processing_llava_ext_onevision",
    "image_processing_llava_ext_onevision", "configuration_llava_ext_next", "modeling_llava_ext_next",
    "configuration_llava_ext_onevision", "modeling_llava_ext_onevision",
)
# Each llava_ext model type -> the auto_map its config.json gets today
FAMILY_AUTO_MAPS = {
    "llava_ext": AUTO_MAP, "llava_ext_next": NEXT_AUTO_MAP, "llava_ext_onevision": ONEVISION_AUTO_MAP,
}
# The model module an auto_map names -> the family (an old checkpoint's model_type may be 'llava')
MODULE_FAMILIES = {
    module: model_type
    for model_type, auto_map in FAMILY_AUTO_MAPS.items()
    for module in {value.rsplit(".", 1)[0] for value in auto_map.values()}
}
PROCESSOR_CLASSES = (
    LlavaExtProcessor, LlavaExtImageProcessor, LlavaExtNextProcessor, LlavaExtNextImageProcessor,
    LlavaExtOnevisionProcessor, LlavaExtOnevisionImageProcessor,
)
PROCESSOR_MODULES = tuple(cls.__module__.rsplit(".", 1)[-1] for cls in PROCESSOR_CLASSES)
# class name -> its auto_map value today, e.g. "LlavaExtProcessor" -> "processing_llava_ext.LlavaExtProcessor"
PROCESSOR_REFERENCES = {
    cls.__name__: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for cls in PROCESSOR_CLASSES
}
PROCESSOR_JSONS = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def refresh_checkpoint_code(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    push_to_hub_repo: str | None = None,
    private: bool = False,
    revision: str | None = None,
) -> Path | None:
    """Replace the llava_ext code inside a checkpoint with the installed llava_ext's, without touching the weights.

    Written: the installed `configuration_llava_ext.py`, `modeling_llava_ext.py` and every module they import
    relatively (`vision.py`), copied as `save_pretrained` copies them; the modules of our processor classes
    (`processing_llava_ext.py`, `image_processing_llava_ext_next.py`, ...) that the checkpoint's processor files name
    or that it carries, with their relative imports;
    config.json's `auto_map` with the family's merged over it (`FAMILY_AUTO_MAPS`: 1.5, NeXT and OneVision
    checkpoints each get their own modules); in processor_config.json, preprocessor_config.json and
    tokenizer_config.json, the `auto_map` values naming our processor classes. A module an older llava_ext shipped
    that the installed code no longer imports is removed. Every other file is carried over byte for byte and no tensor
    is read.

    Args:
        checkpoint (`str` or `os.PathLike`): a llava_ext checkpoint directory, or a Hub repo id (which cannot be
            refreshed in place: give `out_dir`, `push_to_hub_repo` or both).
        out_dir (`str` or `os.PathLike`, *optional*): write the refreshed checkpoint here, as an independent copy,
            instead of in place; must not exist unless `overwrite=True`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out_dir` once the new one is complete.
        push_to_hub_repo (`str`, *optional*): upload the refreshed checkpoint to this Hub repo (see `push_to_hub`).
        private (`bool`, *optional*, defaults to `False`): create the Hub repo private.
        revision (`str`, *optional*): the Hub branch to push to.

    Returns:
        `Path` or `None`: the refreshed directory (the checkpoint itself when refreshed in place); `None` when a Hub
        checkpoint was only pushed, as it is then staged in a temporary directory removed after the upload.

    In place, the refreshed directory replaces the original with two renames once it is complete; its unchanged files
    are hard links to the originals (same inodes). A failure before the swap leaves the original as it was. An
    `out_dir` gets copies, so later writes to either checkpoint never reach the other.
    """
    local = Path(checkpoint).expanduser()
    if not local.is_dir() and local.parent.is_dir():
        clean_interrupted_writes(local)  # an in-place refresh killed between its renames: put the checkpoint back
    target = Path(out_dir).expanduser().absolute() if out_dir is not None else None
    if local.is_dir() and (target is None or target.resolve() == local.resolve()):  # in place
        src_dir = local.resolve()  # a symlinked checkpoint: refresh the directory it points to, keep the link
        _write_refreshed(src_dir, src_dir, _family_of(src_dir), overwrite=True, link=True)
        result = local.absolute()
    elif target is not None:
        check_output_free(target, overwrite)  # before any download
        if local.is_dir() and target.resolve().is_relative_to(local.resolve()):
            raise ValueError(
                f"out_dir {target} is inside the checkpoint {local.absolute()}; choose a directory outside it, or "
                "leave out_dir out to refresh the checkpoint in place."
            )
        src_dir = resolve_source(checkpoint).absolute()
        _write_refreshed(src_dir, target, _family_of(src_dir), overwrite=overwrite, link=False)
        result = target
    elif push_to_hub_repo is None:
        if local.exists():  # a file: resolve_source's error names it
            resolve_source(checkpoint)
        raise ValueError(
            f"{str(checkpoint)!r} is not a local directory, and a Hub checkpoint cannot be refreshed in place: pass "
            "out_dir (--output-dir) or push_to_hub_repo (--push-to-hub), or check the path."
        )
    else:  # a Hub checkpoint pushed only: stage it in a temporary directory, upload it, remove it
        src_dir = resolve_source(checkpoint).absolute()
        family = _family_of(src_dir)
        with tempfile.TemporaryDirectory(prefix="llava-ext-refresh-") as staging:
            staged = Path(staging) / str(checkpoint).rsplit("/", 1)[-1]
            # hard links to the cache's blobs where $TMPDIR shares its filesystem, copies otherwise
            _write_refreshed(src_dir, staged, family, overwrite=False, link=True)
            push_to_hub(staged, push_to_hub_repo, private=private, revision=revision)
        return None
    if push_to_hub_repo:
        push_to_hub(result, push_to_hub_repo, private=private, revision=revision)
    return result


def _family_of(src_dir: Path) -> str:
    """The llava_ext model type of a checkpoint (its model_type, or the family of the modules its auto_map names);
    anything else is refused before writing."""
    config = read_json(src_dir / "config.json")
    model_type, auto_map = config.get("model_type"), config.get("auto_map") or {}
    if model_type in FAMILY_AUTO_MAPS:
        return model_type
    named = [MODULE_FAMILIES[module] for value in _auto_map_values(auto_map)
             if (module := _module_of(value)) in MODULE_FAMILIES]
    if named:
        return named[0]
    if model_type in ("llava", "llava_next", "llava_onevision"):
        raise ValueError(
            f"{src_dir / 'config.json'} has model_type={model_type!r} and no auto_map naming llava_ext code: it is a "
            "stock transformers (or original LLaVA) checkpoint, which ships no code to refresh. To make a llava_ext "
            f"checkpoint from it, run `llava-ext convert {src_dir} OUT`."
        )
    raise ValueError(
        f"{src_dir / 'config.json'} has model_type={model_type!r} and auto_map={auto_map or None}; refresh-code "
        f"updates llava_ext checkpoints only (model_type one of {sorted(FAMILY_AUTO_MAPS)}, or an auto_map naming "
        f"their modules: {', '.join(sorted(MODULE_FAMILIES))}). Convert a LLaVA checkpoint with `llava-ext convert` "
        "first."
    )


def _write_refreshed(src_dir: Path, out_dir: Path, family: str, *, overwrite: bool, link: bool) -> None:
    """Build the refreshed checkpoint of `family` (a llava_ext model type) in a temporary sibling of `out_dir` and
    rename it into place when complete."""
    processor_classes = _processor_classes(src_dir)
    auto_map = FAMILY_AUTO_MAPS[family]
    with atomic_directory(out_dir, overwrite) as tmp:
        written = _write_code(tmp, auto_map, processor_classes)  # first: nothing is linked yet to write through
        updates = {
            "config.json": functools.partial(_merge_model_auto_map, auto_map=auto_map),
            **dict.fromkeys(PROCESSOR_JSONS, _update_processor_refs),
        }
        for name, update in updates.items():
            if (src_dir / name).is_file() and _write_updated_json(src_dir / name, tmp / name, update):
                written.add(name)
        stale = {f"{module}.py" for module in SHIPPED_MODULES if (src_dir / f"{module}.py").is_file()} - written
        # everything else as it is: hard links (in place or staged) or copies (an independent out_dir)
        shutil.copytree(
            src_dir,
            tmp,
            copy_function=_link_or_copy if link else shutil.copy2,
            ignore=lambda folder, names: written | stale if Path(folder) == src_dir else set(),
            dirs_exist_ok=True,  # also copies the directory's mode onto tmp, which mkdtemp made 0700
        )
        for name in sorted(written):
            old = src_dir / name
            if not old.is_file():
                change = "added"
            else:
                change = "unchanged" if old.read_bytes() == (tmp / name).read_bytes() else "replaced"
            logger.info(f"{name}: {change} (llava_ext {__version__})")
        for name in sorted(stale):
            logger.info(f"{name}: removed (the installed llava_ext {__version__} no longer ships it)")


def _write_code(out_dir: Path, auto_map: dict, processor_classes: list[type]) -> set[str]:
    """The installed modules `auto_map`'s classes and `processor_classes` need, copied as save_pretrained does."""
    classes = [_class_of(value) for value in auto_map.values()] + processor_classes
    written = set()
    for cls in classes:  # custom_object_save copies the class's module and, recursively, its relative imports
        written.update(Path(path).name for path in custom_object_save(cls, out_dir))
    return written


def _class_of(auto_map_value: str) -> type:
    """'modeling_llava_ext.LlavaExtModel' -> the installed class."""
    module, name = auto_map_value.rsplit(".", 1)
    return getattr(importlib.import_module(f"llava_ext.{module}"), name)


def _processor_classes(src_dir: Path) -> list[type]:
    """Our processor classes the checkpoint uses: those its processor files name or whose module it carries."""
    named = {
        _our_processor(value)
        for name in PROCESSOR_JSONS
        if (src_dir / name).is_file()
        for auto_map in _auto_maps(read_json(src_dir / name))
        for value in _auto_map_values(auto_map)
    }
    carried = {module for module in PROCESSOR_MODULES if (src_dir / f"{module}.py").is_file()}
    return [cls for cls in PROCESSOR_CLASSES if cls.__name__ in named or cls.__module__.rsplit(".", 1)[-1] in carried]


def _write_updated_json(src: Path, dst: Path, update: Callable[[dict], bool]) -> bool:
    """Write `update`d JSON in the file's own formatting (transformers': indent 2, sorted); False if nothing changed."""
    text = src.read_text(encoding="utf-8")
    data = read_json(src)
    if not update(data):
        return False
    original = json.loads(text)
    for sort_keys, ensure_ascii, end in itertools.product((True, False), (True, False), ("\n", "")):
        if json.dumps(original, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + end == text:
            break
    else:  # hand-edited: write it as transformers would (tokenizer_config.json keeps non-ASCII characters)
        sort_keys, ensure_ascii, end = True, src.name != "tokenizer_config.json", "\n"
    dst.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + end, encoding="utf-8")
    return True


def _merge_model_auto_map(config: dict, auto_map: dict) -> bool:
    """config.json: the family's `auto_map` over the existing one (other entries kept); True if that changed it."""
    merged = {**(config.get("auto_map") or {}), **auto_map}
    if merged == config.get("auto_map"):
        return False
    config["auto_map"] = merged
    return True


def _update_processor_refs(data: dict) -> bool:
    """Point every auto_map value naming our processor classes (at any depth) at today's modules; True if one moved."""
    changed = False
    for auto_map in _auto_maps(data):
        for key, value in list(auto_map.items()):
            values = value if isinstance(value, list) else [value]  # a tokenizer's is [slow, fast]
            current = [PROCESSOR_REFERENCES[_our_processor(v)] if _our_processor(v) else v for v in values]
            if current != values:
                auto_map[key] = current if isinstance(value, list) else current[0]
                changed = True
    return changed


def _auto_maps(data) -> Iterator[dict]:
    """Every `auto_map` dict in a JSON document (processor_config.json nests the image processor's)."""
    if isinstance(data, dict):
        if isinstance(data.get("auto_map"), dict):
            yield data["auto_map"]
        for child in data.values():
            yield from _auto_maps(child)
    elif isinstance(data, list):
        for child in data:
            yield from _auto_maps(child)


def _our_processor(value) -> str | None:
    """'processing_llava_ext.LlavaExtProcessor' -> 'LlavaExtProcessor'; None for other classes or other repos' code."""
    module = _module_of(value)
    name = value.rsplit(".", 1)[-1] if module else None
    return name if module in SHIPPED_MODULES and name in PROCESSOR_REFERENCES else None


def _auto_map_values(auto_map: dict) -> list:
    """The class references of an auto_map, a tokenizer's [slow, fast] pair flattened."""
    return [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value])]


def _module_of(value) -> str | None:
    """'modeling_llava_ext.LlavaExtModel' -> 'modeling_llava_ext'; None for 'owner/repo--module.Class' and non-names."""
    return value.rsplit(".", 1)[0] if isinstance(value, str) and "--" not in value and "." in value else None


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link (no data copied; a Hub snapshot's symlink resolved to its blob), or a copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


__all__ = ["refresh_checkpoint_code"]
