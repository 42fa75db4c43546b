"""Checkpoint files in and out: resolve a source, read its tensors lazily, stream them into sharded safetensors, and
publish an output directory atomically.

Memory: a conversion holds at most one converted tensor at a time. Sources are read through safetensors' memory map
(or `torch.load(mmap=True, weights_only=True)` for `.bin`), and each output shard is written tensor by tensor, so the
resident set stays near the size of the source's mapped pages plus the largest tensor, never two copies of the model.

    source files --mmap--> one tensor --rename / cast / resize--> file.write(bytes) --> shard --> ... --> os.rename

Faults: `check_checkpoint_files` reads every small file a load parses and every safetensors header before any heavy
work, so a truncated download or a half-copied checkpoint is named, with the fix, instead of surfacing as a bare
`JSONDecodeError` or `SafetensorError` from inside transformers. A run killed while writing (SIGKILL, OOM killer)
leaves at most a `.OUT.PID.XXXX.partial` or `.OUT.PID.XXXX.old` sibling, which the next run over the same OUT
removes (or, for an `.old` holding the only copy of OUT, puts back).
"""

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download, split_torch_state_dict_into_shards
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from transformers import logging

from ..compat import tqdm

logger = logging.get_logger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# JSON files from_pretrained parses: transformers names the file for config.json but not for the others
MODEL_JSONS = ("config.json", "generation_config.json", SAFETENSORS_INDEX, BIN_INDEX)
PROCESSOR_JSONS = (
    "processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json",
)
# a tokenizer needs one of these (fast, sentencepiece, BPE, WordPiece, tiktoken vocabularies); every LLaVA backbone
# ships tokenizer.json or tokenizer.model
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json", "*.tiktoken")
LFS_POINTER = b"version https://git-lfs"
# files a conversion reads from a Hub snapshot; weights in pickled `.bin` are fetched only when no safetensors exist
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def resolve_source(source: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A local directory as is, or a Hub repo id downloaded with `snapshot_download`; a clear error otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"The {what} {str(source)!r} is a file; give the directory that holds its config.json.")
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise FileNotFoundError(
            f"The {what} {str(source)!r} is neither a local directory nor a Hub repo id (owner/name); check the path."
        ) from None
    try:
        snapshot = Path(snapshot_download(str(source), allow_patterns=SNAPSHOT_PATTERNS))
        if not any(snapshot.glob("*.safetensors")) and any(snapshot.glob("*.json")):
            snapshot = Path(snapshot_download(str(source), allow_patterns=SNAPSHOT_PATTERNS + ["*.bin"]))
    except Exception as error:  # offline, missing, gated: huggingface_hub raises a dozen types; all mean "no files"
        raise FileNotFoundError(
            f"The {what} {str(source)!r} is not a local directory and could not be downloaded from the Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}). Check the repo "
            "id and your connection or login (`hf auth login`), or download it first and pass the local directory."
        ) from None
    return snapshot


def read_json(path: Path) -> dict:
    """A JSON file as a dict, with an error naming the file if it is missing or malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a checkpoint directory needs it.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file may be truncated: download it again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again.")
    return data


def check_checkpoint_files(
    directory: str | os.PathLike,
    *,
    weights: bool = True,
    processor: bool = True,
    config_name: str | None = "config.json",
    what: str = "checkpoint",
) -> None:
    """Fail fast, naming the file and the fix, on a checkpoint whose files a load would choke on.

    Checked without reading any tensor data: `config_name` and the other JSON files transformers parses (present
    where required, valid JSON objects); with `weights`, the safetensors index (valid, every shard it lists present)
    and each safetensors file's header (the data it describes fully in the file, so a truncated, overwritten or Git
    LFS pointer file fails here); with `processor`, that a tokenizer vocabulary is there. For these faults
    transformers raises a bare `JSONDecodeError`, `SafetensorError` or "Couldn't instantiate the backend tokenizer",
    none naming the file. `.bin` weights, and a directory with no weights, are left to the loader, which names them.

    Args:
        directory (`str` or `os.PathLike`): a local checkpoint (or LoRA adapter) directory.
        weights (`bool`, *optional*, defaults to `True`): check the weights (model.safetensors, its shards and index,
            or adapter_model.safetensors).
        processor (`bool`, *optional*, defaults to `True`): check the processor and tokenizer files.
        config_name (`str`, *optional*, defaults to `"config.json"`): the file that must be there
            (`"adapter_config.json"` for a LoRA adapter, `None` for a processor saved on its own).
        what (`str`, *optional*, defaults to `"checkpoint"`): how errors name the directory.

    Raises:
        `FileNotFoundError` for a missing file, `ValueError` for a malformed one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"The {what} {str(directory)!r} is not a directory; check the path.")
    if config_name is not None and not (directory / config_name).is_file():
        raise FileNotFoundError(
            f"{directory / config_name} does not exist: is {directory} a {what} directory? If it is, the download or "
            "copy is incomplete: download it again."
        )
    for name in ([config_name] if config_name else []) + [*MODEL_JSONS, *(PROCESSOR_JSONS if processor else ())]:
        if (directory / name).is_file():
            read_json(directory / name)
    if weights:
        for path in _safetensors_files(directory):
            with _open_safetensors(path):
                pass
    if processor and not any(any(directory.glob(pattern)) for pattern in TOKENIZER_VOCABULARIES):
        raise FileNotFoundError(
            f"The {what} {directory} has no tokenizer: none of {', '.join(TOKENIZER_VOCABULARIES)} is there. Copy "
            "the tokenizer files from the model it was made from (or save its processor there with "
            "`processor.save_pretrained`), or download the checkpoint again."
        )


def _safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files a load reads: the index's shards (each must exist), or the single file(s)."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return [directory / name for name in _index_shards(index)]
    single = [directory / "model.safetensors", directory / "adapter_model.safetensors"]
    return [path for path in single if path.is_file()]


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index lists; an error naming the index if it has no weight_map or a shard is missing."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map; the file may be truncated: download it again.")
    names = sorted(set(weight_map.values()))
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index} lists {missing} but they are not in {index.parent}; the download or copy is incomplete: "
            "download them again."
        )
    return names


class TensorSource:
    """Lazy, read-only view of a checkpoint's tensors across its safetensors (or weights-only `.bin`) files.

    Args:
        directory (`Path`): a directory holding `model.safetensors`, sharded safetensors with their index, or
            `pytorch_model*.bin` files (read with `torch.load(weights_only=True)`, never unpickled freely).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        safetensors_files = sorted(self.directory.glob("*.safetensors"))
        bin_files = sorted(self.directory.glob("pytorch_model*.bin"))
        if safetensors_files:
            for path in self._indexed_files(SAFETENSORS_INDEX, safetensors_files):
                self._handles[path] = handle = _open_safetensors(path)
                self._files.update(dict.fromkeys(handle.keys(), path))
        elif bin_files:
            for path in self._indexed_files(BIN_INDEX, bin_files):
                self._handles[path] = state_dict = _load_bin(path)
                self._files.update(dict.fromkeys(state_dict, path))
        else:
            raise FileNotFoundError(
                f"{self.directory} has no weights: expected model.safetensors (or shards with {SAFETENSORS_INDEX}) or "
                "pytorch_model*.bin."
            )

    def _indexed_files(self, index_name: str, found: list[Path]) -> list[Path]:
        index = self.directory / index_name
        if not index.is_file():
            return found
        return [self.directory / name for name in _index_shards(index)]

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (reads no data)."""
        handle = self._handles[self._files[name]]
        if isinstance(handle, dict):
            tensor = handle[name]
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        tensor_slice = handle.get_slice(name)
        dtype = _dtype_from_safetensors(tensor_slice.get_dtype())
        return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles[self._files[name]]
        if isinstance(handle, dict):
            return handle[name]
        try:  # a fresh handle per tensor: its memory map (and the pages read through it) goes when it closes
            with safe_open(str(self._files[name]), framework="pt") as fresh:
                return fresh.get_tensor(name)
        except Exception as error:
            raise ValueError(
                f"Could not read tensor {name!r} from {self._files[name]} ({error}); the file may be truncated: "
                "download it again."
            ) from None


def _open_safetensors(path: Path):
    """`safe_open`, turning a truncated or corrupt file (checked against its header) into an error that names it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:
        with path.open("rb") as file:
            if file.read(len(LFS_POINTER)) == LFS_POINTER:
                raise ValueError(
                    f"{path} is a Git LFS pointer, not the weights: the repository was cloned without git-lfs. Run "
                    "`git lfs pull` in it, or download it with `hf download`."
                ) from None
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); it is probably truncated "
            "by an interrupted download or copy: download it again."
        ) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint loaded with `weights_only=True` (tensors only; arbitrary objects are refused)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        pass
    except Exception as error:
        raise ValueError(
            f"Refusing to load {path}: it holds more than tensors ({type(error).__name__}: {str(error)[:200]}), and "
            "unpickling it could run arbitrary code. Convert it to safetensors in a trusted environment first."
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Refusing to load {path} with weights_only=True ({type(error).__name__}): convert it to safetensors in a "
            "trusted environment first."
        ) from None


def _dtype_from_safetensors(name: str) -> torch.dtype:
    for dtype, code in SAFETENSORS_DTYPES.items():
        if code == name:
            return dtype
    raise ValueError(f"Unsupported safetensors dtype {name!r}; supported: {sorted(SAFETENSORS_DTYPES.values())}.")


@dataclass
class PlannedTensor:
    """One output tensor: its final shape and dtype (a meta tensor) and how to make it when its turn comes."""

    meta: torch.Tensor
    make: Callable[[], torch.Tensor]


def write_sharded_safetensors(
    plan: dict[str, PlannedTensor], out_dir: Path, max_shard_size: int | str = "5GB", progress: bool = True
) -> list[str]:
    """Stream `plan` into `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index), one tensor in memory.

    Shards are split as transformers' `save_pretrained` splits them (huggingface_hub's splitter, on meta tensors).
    Returns the written file names.
    """
    split = split_torch_state_dict_into_shards(
        {name: planned.meta for name, planned in plan.items()},
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    bar = tqdm(total=len(plan), desc="Converting tensors", unit="tensor", disable=not progress)
    for filename, names in split.filename_to_tensors.items():
        _write_safetensors_file(out_dir / filename, {name: plan[name] for name in names}, on_tensor=bar.update)
    bar.close()
    written = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": _num_parameters(plan)},
                 "weight_map": split.tensor_to_filename}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(SAFETENSORS_INDEX)
    return written


def _num_parameters(plan: dict[str, PlannedTensor]) -> int:
    return sum(planned.meta.numel() for planned in plan.values())


def _write_safetensors_file(path: Path, plan: dict[str, PlannedTensor], on_tensor: Callable[[], None]) -> None:
    """The safetensors format by hand (8-byte header size, JSON header, raw little-endian data) so data can stream."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, planned in plan.items():
        size = planned.meta.numel() * planned.meta.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[planned.meta.dtype], "shape": list(planned.meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data start to 8 bytes
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for name, planned in plan.items():
            tensor = planned.make()
            if tensor.shape != planned.meta.shape or tensor.dtype != planned.meta.dtype:
                raise AssertionError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, planned {planned.meta}")
            file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            on_tensor()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; rename it to `out_dir` only if the block completes.

    A failure or Ctrl-C removes the temporary directory and leaves `out_dir` as it was. An existing `out_dir` is
    refused unless `overwrite=True`, in which case it is replaced only after the new one is complete. A process
    killed outright (SIGKILL, the OOM killer) leaves `out_dir` absent, as it was, or complete and new, plus a
    `.NAME.PID.XXXX.partial` or `.old` sibling that the next call for the same `out_dir` tidies away:

        .out.PID.XXXX.partial/  --filled, then renamed-->  out/
        out/ (overwrite)        --renamed first-->         .out.PID.XXXX.old/old  --> removing --> deleted
    """
    out_dir = Path(out_dir).expanduser().absolute()
    check_output_free(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.{os.getpid()}."  # the PID tells a later run whether the writer is still alive
    tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp_dir
        if out_dir.exists():  # overwrite: move the old one aside first so there is never a half-written out_dir
            old_dir = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=out_dir.parent))
            try:
                os.replace(out_dir, old_dir / "old")
            except BaseException:
                old_dir.rmdir()
                raise
            try:
                os.replace(tmp_dir, out_dir)
            except BaseException:
                os.replace(old_dir / "old", out_dir)  # put the original back before reporting the failure
                old_dir.rmdir()
                raise
            # `old` is only ever a complete out_dir, which clean_interrupted_writes may put back: rename it before
            # deleting it file by file
            os.replace(old_dir / "old", old_dir / "removing")
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def read_llava_checkpoint(
    src: str | os.PathLike, tool: str, model_types: tuple[str, ...] = ("llava_ext", "llava")
) -> tuple[Path, dict]:
    """The local folder of the checkpoint `src` (one of `model_types`: llava_ext or stock llava unless told), its files
    checked, and its config.json; `tool` names the command in the error for any other model type."""
    src_dir = resolve_source(src)
    check_checkpoint_files(src_dir)
    config_dict = read_json(src_dir / "config.json")
    if config_dict.get("model_type") not in model_types:
        raise ValueError(
            f"{src_dir} has model_type={config_dict.get('model_type')!r}; {tool} takes a "
            f"{', '.join(model_types[:-1])} or {model_types[-1]} checkpoint (convert an original LLaVA checkpoint "
            "with `llava-ext convert` first)."
        )
    return src_dir, config_dict

def check_output_free(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output directory (before any heavy work) unless overwriting was asked for.

    What a killed earlier run left beside `out_dir` is tidied first (`clean_interrupted_writes`), which may put a
    moved-aside `out_dir` back.
    """
    clean_interrupted_writes(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or pass --overwrite.")


def clean_interrupted_writes(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings that killed runs left beside `out_dir`, putting back an `out_dir` moved aside.

    Only `.NAME.PID.XXXX.partial` and `.NAME.PID.XXXX.old` directories (see `atomic_directory`) whose process PID no
    longer runs on this machine are touched, so a run writing the same `out_dir` at this moment keeps its own. A
    `.partial` directory is always incomplete and is deleted. An `.old` directory still holding `old` kept the previous
    `out_dir` while an overwrite was killed between its two renames: with `out_dir` missing, `old` is renamed back.

    Args:
        out_dir (`str` or `os.PathLike`): the output directory about to be written.

    Returns:
        `list[Path]`: the stale directories found, each also logged as a warning.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)\.[^.]+\.(partial|old)")
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing of ours can be there
        return []
    stale = [path for path in siblings
             if (match := pattern.fullmatch(path.name)) and path.is_dir() and not _process_running(int(match[1]))]
    stale.sort(key=lambda path: path.suffix != ".old")  # .old first: out_dir is back before anything is deleted
    for path in stale:
        pid = pattern.fullmatch(path.name)[1]
        if path.suffix == ".old" and (path / "old").is_dir() and not out_dir.exists():
            os.replace(path / "old", out_dir)
            logger.warning(f"Put {out_dir} back from {path}: a run replacing it (process {pid}) was killed midway.")
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            logger.warning(f"{path} was left by a killed llava-ext run (process {pid}) and could not be removed; "
                           "delete it by hand.")
        else:
            logger.warning(f"Removed {path}, left by a llava-ext run (process {pid}) killed while writing {out_dir}.")
    return stale


def _process_running(pid: int) -> bool:
    """Whether `pid` is a live (or unreaped) process here; on Windows always, where `os.kill(pid, 0)` would signal."""
    if os.name == "nt" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


__all__ = [
    "PlannedTensor",
    "TensorSource",
    "atomic_directory",
    "check_checkpoint_files",
    "check_output_free",
    "clean_interrupted_writes",
    "read_json",
    "read_llava_checkpoint",
    "resolve_source",
    "write_sharded_safetensors",
]
