"""Faults: broken checkpoint files are named before any work, and a killed writer never leaves an OUT that looks done.

Broken files: each case breaks one file of a tiny checkpoint (model.safetensors truncated, overwritten by an HTML
page or left as a Git LFS pointer; config.json, the shard index or tokenizer_config.json not JSON; a shard the index
lists missing; no tokenizer) and every tool must name that file and the fix. transformers' own messages, checked on
5.17 and 5.24 when these checks were written, name the file only for config.json (AutoModel), a missing shard and a
missing weights file; `AutoProcessor` with a bad config.json or tokenizer_config.json raises a bare JSONDecodeError,
the model loaders a bare SafetensorError, a missing tokenizer.json "Couldn't instantiate the backend tokenizer".

Kills: the tool runs in a forked child (everything is already imported, so a run costs well under a second) that is
SIGKILLed, either by itself where a patched function is reached or by the parent at a range of times into a slowed
run. OUT must then be absent, the old OUT byte for byte (`--overwrite`), or the complete new one; anything else beside
it must be a `.out.PID.*.partial` / `.old` directory of the killed process, which the next run removes (putting the
old OUT back if the kill fell between the two renames of an overwrite). A slow test does the same with the real
`llava-ext` command in a subprocess, killed when its temporary directory appears and at delays after that.

    pytest --fork--> child: convert / export / merge-lora --SIGKILL (at a point, or after t ms)--+
    pytest <-- waitpid --------------------------------------------------------------------------+
           --> OUT absent / old / new and complete?  leftovers only .out.PID.*?  --> run again: only OUT is left
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import tqdm.std
from conftest import HANG_GUARD_S, tiny_llava_config
from test_data import make_processor
from transformers import AutoModelForImageTextToText, LlamaConfig, TrainingArguments

import llava_ext.convert.io as convert_io
import llava_ext.convert.to_llava_ext as to_llava_ext
import llava_ext.convert.to_stock as to_stock
from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.cli import main
from llava_ext.convert import convert_checkpoint, export_checkpoint
from llava_ext.convert.io import check_checkpoint_files, clean_interrupted_writes
from llava_ext.processing_llava_ext import LlavaExtProcessor
from llava_ext.chat import load_model_and_processor
from llava_ext.train import DataArguments, ModelArguments, apply_lora, build_trainer, merge_lora

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork the tool (POSIX only)")
LFS_POINTER_TEXT = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n"
)
TOOLS = ("convert", "export")
KILLS = 8  # kills at random times per tool and mode, spread evenly over one uninterrupted run


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny llava_ext checkpoint with its processor (single file and sharded) and a LoRA adapter trained on it."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict()))
    paths = {"single": root / "tiny", "sharded": root / "tiny-sharded", "adapter": root / "tiny-lora"}
    model.save_pretrained(paths["single"])
    model.save_pretrained(paths["sharded"], max_shard_size="20KB")
    for name in ("single", "sharded", "adapter"):
        make_processor().save_pretrained(paths[name])

    base = AutoModelForImageTextToText.from_pretrained(paths["single"], trust_remote_code=True)
    lora = apply_lora(base, ModelArguments(model_name_or_path=str(paths["single"]), lora_enable=True, lora_r=4,
                                           lora_alpha=8))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make the merge a no-op
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    lora.save_pretrained(paths["adapter"])
    return paths


def copy_of(source: Path, tmp_path: Path, name: str = "broken") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def tree(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


# --------------------------------------------------------------------------------------------------- broken files
def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def not_json(path: Path) -> Path:
    path.write_text(path.read_text()[:20])  # cut mid-object, as an interrupted download leaves it
    return path


def last_shard_missing(directory: Path) -> Path:
    sorted(directory.glob("model-*.safetensors"))[-1].unlink()
    return directory / "model.safetensors.index.json"


# case -> (which checkpoint, break it (returns the file to name), message with {file} and {dir})
BROKEN = {
    "truncated-weights": ("single", lambda d: truncate(d / "model.safetensors"),
                          r"{file} is not a readable safetensors file \(SafetensorError: .*incomplete metadata.*\); "
                          r"it is probably truncated by an interrupted download or copy: download it again"),
    "html-as-weights": ("single", lambda d: _write(d / "model.safetensors", "<!DOCTYPE html><html>Not Found</html>"),
                        r"{file} is not a readable safetensors file .*download it again"),
    "lfs-pointer-weights": ("single", lambda d: _write(d / "model.safetensors", LFS_POINTER_TEXT),
                            r"{file} is a Git LFS pointer, not the weights: the repository was cloned without "
                            r"git-lfs. Run `git lfs pull` in it, or download it with `hf download`"),
    "config-not-json": ("single", lambda d: not_json(d / "config.json"),
                        r"{file} is not valid JSON \(.*\); the file may be truncated: download it again"),
    "index-not-json": ("sharded", lambda d: not_json(d / "model.safetensors.index.json"),
                       r"{file} is not valid JSON \(.*\); the file may be truncated: download it again"),
    "shard-missing": ("sharded", last_shard_missing,
                      r"{file} lists \['model-000\d\d-of-000\d\d.safetensors'\] but they are not in {dir}; the "
                      r"download or copy is incomplete: download them again"),
    "tokenizer-config-not-json": ("single", lambda d: not_json(d / "tokenizer_config.json"),
                                  r"{file} is not valid JSON \(.*\); the file may be truncated: download it again"),
    "no-tokenizer": ("single", lambda d: _unlink(d / "tokenizer.json"),
                     r"The checkpoint {dir} has no tokenizer: none of tokenizer.json, tokenizer.model, .* is there. "
                     r"Copy the tokenizer files from the model it was made from"),
}
MODEL_FAULTS = [name for name in BROKEN if "tokenizer" not in name]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


def break_checkpoint(checkpoints, case: str, tmp_path: Path, source: str | None = None) -> tuple[Path, str]:
    """A broken copy of a fixture checkpoint and the regex its error must match."""
    kind, fault, message = BROKEN[case]
    broken = copy_of(checkpoints[source or kind], tmp_path)
    file = fault(broken)
    return broken, message.format(file=re.escape(str(file)), dir=re.escape(str(broken)))


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("tool", TOOLS)
def test_convert_and_export_name_the_broken_file(checkpoints, tmp_path, tool, case):
    broken, message = break_checkpoint(checkpoints, case, tmp_path)
    with pytest.raises(SystemExit, match=rf"llava-ext {tool}: error: {message}"):
        main([tool, str(broken), str(tmp_path / "out")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken"]  # nothing written, not even a .partial


@pytest.mark.parametrize("case", MODEL_FAULTS)
def test_merge_lora_names_a_broken_base_model(checkpoints, tmp_path, case):
    broken, message = break_checkpoint(checkpoints, case, tmp_path)
    with pytest.raises(SystemExit, match=rf"llava-ext merge-lora: error: {message}"):
        main(["merge-lora", str(checkpoints["adapter"]), str(tmp_path / "out"), "--base-model", str(broken)])
    assert not (tmp_path / "out").exists()


ADAPTER_BROKEN = {
    "adapter-weights-truncated": (lambda d: truncate(d / "adapter_model.safetensors"),
                                  r"{file} is not a readable safetensors file .*download it again"),
    "adapter-config-not-json": (lambda d: not_json(d / "adapter_config.json"),
                                r"{file} is not valid JSON \(.*\); the file may be truncated: download it again"),
    "tokenizer-config-not-json": (lambda d: not_json(d / "tokenizer_config.json"), r"{file} is not valid JSON"),
    "no-tokenizer": (lambda d: _unlink(d / "tokenizer.json"), r"The LoRA adapter {dir} has no tokenizer"),
}


@pytest.mark.parametrize("case", ADAPTER_BROKEN)
def test_merge_lora_names_a_broken_adapter(checkpoints, tmp_path, case):
    fault, message = ADAPTER_BROKEN[case]
    broken = copy_of(checkpoints["adapter"], tmp_path)
    file = fault(broken)
    message = message.format(file=re.escape(str(file)), dir=re.escape(str(broken)))
    with pytest.raises(SystemExit, match=rf"llava-ext merge-lora: error: {message}"):
        main(["merge-lora", str(broken), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_merge_lora_names_a_moved_base_model(checkpoints, tmp_path):
    adapter = copy_of(checkpoints["adapter"], tmp_path, "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/tiny"}))
    with pytest.raises(FileNotFoundError, match=r"The base model '/gone/tiny' recorded in .*adapter_config.json does "
                                                r"not exist \(moved or deleted\?\); pass it with base_model"):
        merge_lora(adapter, tmp_path / "out")


@pytest.mark.parametrize("case", ["config-not-json", "tokenizer-config-not-json"])
def test_refresh_code_names_a_broken_json(checkpoints, tmp_path, case):
    broken, message = break_checkpoint(checkpoints, case, tmp_path)
    with pytest.raises(SystemExit, match=rf"llava-ext refresh-code: error: {message}"):
        main(["refresh-code", str(broken), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_check_checkpoint_files_passes_good_checkpoints_and_names_a_missing_config(checkpoints, tmp_path):
    for name in ("single", "sharded"):
        check_checkpoint_files(checkpoints[name])
    check_checkpoint_files(checkpoints["adapter"], config_name="adapter_config.json")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}/config.json does not exist: is "
                                                r".* a checkpoint directory\? If it is, the download or copy is "
                                                r"incomplete"):
        check_checkpoint_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"The checkpoint '.*nowhere' is not a directory; check the path"):
        check_checkpoint_files(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------------------ kills
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally, no atexit: what the OOM killer does


def private_progress_bar_lock() -> None:
    """In a forked child: a write lock for tqdm's progress bars that no other process shares.

    tqdm's own lock holds a multiprocessing lock, shared with pytest across the fork: a child killed while drawing a
    progress bar left it held, every later child then waited on it until its timeout, and so did pytest's own next
    progress bar, for ever. Its thread lock, copied at the fork, may also be held by a thread the child does not have.
    """
    lock = threading.RLock()
    classes = [tqdm.std.tqdm]  # every subclass (transformers', huggingface_hub's) may hold its own reference
    while classes:
        cls = classes.pop()
        cls.set_lock(lock)
        classes.extend(cls.__subclasses__())


def fork_run(run: Callable[[], object], setup: Callable[[], object] = lambda: None, kill_after: float | None = None,
             timeout: float = HANG_GUARD_S) -> tuple[int, int]:
    """Run `setup(); run()` in a forked child; SIGKILL it after `kill_after` seconds if given. (pid, wait status)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        private_progress_bar_lock()
        code = 0
        try:
            setup()
            run()
        except BaseException as error:  # noqa: BLE001 (reported through the exit code)
            print(f"child failed: {type(error).__name__}: {error}", file=sys.stderr)
            code = 1
        os._exit(code)
    start = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie until reaped: still signalable
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return pid, status
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child ran past {timeout} s")
        time.sleep(0.002)


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@needs_fork
def test_a_child_killed_while_drawing_a_progress_bar_leaves_the_parents_bars_free():
    """The kill tests' children draw progress bars (loading weights, writing): one killed mid-draw must not leave
    pytest's next progress bar waiting for ever on a lock it shared (see `private_progress_bar_lock`)."""
    tqdm.std.tqdm.get_lock()  # the parent's lock exists before the fork, as once any bar has been drawn
    shared = getattr(tqdm.std.TqdmDefaultWriteLock, "mp_lock", None)
    if shared is None:
        pytest.skip("tqdm has no multiprocessing lock here")
    pid, status = fork_run(lambda: (tqdm.std.tqdm.get_lock().acquire(), die()))
    assert killed(status)
    free = shared.acquire(timeout=5)
    if free:
        shared.release()
    else:
        private_progress_bar_lock()  # the rest of the session must not wait on the dead child's lock
    assert free, "a child killed while holding tqdm's lock left the parent's progress bars waiting"


def state_after_kill(parent: Path, pid: int, old: dict | None, new: dict) -> str:
    """'absent', 'old' or 'new' for OUT (anything else fails) | the kinds of directory the killed process left."""
    out = parent / "out"
    leftovers = sorted(path.name for path in parent.iterdir() if path.name != "out")
    for name in leftovers:
        assert re.fullmatch(rf"\.out\.{pid}\.[^.]+\.(partial|old)", name), f"unexpected {name} beside OUT"
    if not out.exists():
        state = "absent"
    elif old is not None and tree(out) == old:
        state = "old"
    else:
        assert tree(out) == new, "OUT exists but is neither the old directory nor the complete new one"
        state = "new"
    return f"{state} | {','.join(sorted({name.rsplit('.', 1)[1] for name in leftovers})) or 'nothing'}"


def slow_tensor_writes(seconds: float) -> None:
    """In the child: sleep after each tensor written, so a kill at a random time mostly lands mid-write."""
    real = convert_io._write_safetensors_file

    def write(path, plan, on_tensor):
        def on_tensor_slowly():
            time.sleep(seconds)
            on_tensor()
        real(path, plan, on_tensor_slowly)

    convert_io._write_safetensors_file = write


def slow_merged_weights_save(seconds: float) -> None:
    """In the child: merge-lora waits before writing its weights (into the temporary directory, which now exists)."""
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def save_slowly(*args, **kwargs):
        time.sleep(seconds)
        real(*args, **kwargs)

    modeling_utils.safe_save_file = save_slowly


def kill_at_tensor(n: int) -> None:
    """In the child: SIGKILL right after the n-th tensor's bytes are written."""
    real, count = convert_io._write_safetensors_file, [0]

    def write(path, plan, on_tensor):
        def counted():
            count[0] += 1
            if count[0] == n:
                die()
            on_tensor()
        real(path, plan, counted)

    convert_io._write_safetensors_file = write


def kill_before_model_card() -> None:
    """In the child: SIGKILL when convert or export starts the model card (weights, config and processor written)."""
    for module in (to_llava_ext, to_stock):
        module.model_card = lambda *args, **kwargs: die()


def kill_at_rename(n: int) -> None:
    """In the child: SIGKILL at the n-th `os.replace` (1: the new directory is complete, 2: the old one is aside)."""
    real, count = os.replace, [0]

    def replace(src, dst):
        count[0] += 1
        if count[0] == n:
            die()
        real(src, dst)

    os.replace = replace


def kill_removing_old() -> None:
    """In the child: SIGKILL halfway through deleting the replaced OUT (after the swap)."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".old"):
            next(path for path in Path(path).rglob("*") if path.is_file()).unlink()
            die()
        real(path, *args, **kwargs)

    shutil.rmtree = rmtree


def kill_when_saving_merged_weights() -> None:
    """In the child: merge-lora's weights file half written by transformers' save_pretrained, then SIGKILL."""
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def save_half(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        truncate(Path(filename))
        die()

    modeling_utils.safe_save_file = save_half


def runner(tool: str, checkpoints, out: Path, overwrite: bool) -> Callable[[], object]:
    if tool == "convert":
        return lambda: convert_checkpoint(checkpoints["single"], out, overwrite=overwrite, max_shard_size="20KB",
                                          progress=False)
    if tool == "export":
        return lambda: export_checkpoint(checkpoints["single"], out, overwrite=overwrite, max_shard_size="20KB",
                                         progress=False)
    return lambda: merge_lora(checkpoints["adapter"], out, overwrite=overwrite)


@pytest.fixture(scope="module")
def reference_outputs(checkpoints, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Each tool's uninterrupted output, written to a directory named `out` like the killed runs' (the model card
    names it)."""
    outputs = {}
    for tool in ("convert", "export", "merge-lora"):
        out = tmp_path_factory.mktemp(f"reference-{tool}") / "out"
        runner(tool, checkpoints, out, overwrite=False)()
        outputs[tool] = tree(out)
    return outputs


def old_output(parent: Path) -> dict[str, bytes]:
    """An existing OUT, standing for the previous conversion an --overwrite replaces."""
    out = parent / "out"
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llava_ext"}\n')
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("the old run's notes")
    return tree(out)


KILL_POINTS = {  # name -> (tools, child setup, what is left without --overwrite, with it)
    "mid-weights": (("convert", "export"), lambda: kill_at_tensor(30), "absent | partial", "old | partial"),
    "before-model-card": (("convert", "export"), kill_before_model_card, "absent | partial", "old | partial"),
    "mid-merged-weights": (("merge-lora",), kill_when_saving_merged_weights, "absent | partial", "old | partial"),
    "before-processor": (("merge-lora",), lambda: setattr(LlavaExtProcessor, "save_pretrained", lambda *a, **k: die()),
                         "absent | partial", "old | partial"),
    # the first rename moves the new directory in, or with --overwrite the old one aside (into an .old directory)
    "before-first-rename": (("convert", "merge-lora"), lambda: kill_at_rename(1), "absent | partial",
                            "old | old,partial"),
    "between-renames": (("convert", "merge-lora"), lambda: kill_at_rename(2), None, "absent | old,partial"),
    "removing-old": (("convert",), kill_removing_old, None, "new | old"),
}
KILL_CASES = [(point, tool, overwrite) for point, (tools, _, fresh, replacing) in KILL_POINTS.items()
              for tool in tools for overwrite, allowed in ((False, fresh), (True, replacing)) if allowed]


@needs_fork
@pytest.mark.parametrize(("point", "tool", "overwrite"), KILL_CASES,
                         ids=[f"{tool}-{point}{'-overwrite' if overwrite else ''}" for point, tool, overwrite in
                              KILL_CASES])
def test_a_kill_at_each_point_leaves_no_complete_looking_out_and_the_next_run_tidies(
    checkpoints, reference_outputs, tmp_path, point, tool, overwrite
):
    _, setup, fresh, replacing = KILL_POINTS[point]
    parent = tmp_path / "parent"
    old = old_output(parent) if overwrite else None
    run = runner(tool, checkpoints, parent / "out", overwrite)
    pid, status = fork_run(run, setup)
    assert killed(status), f"the child was not killed at {point} (wait status {status})"
    assert state_after_kill(parent, pid, old, reference_outputs[tool]) == (replacing if overwrite else fresh)

    run()  # the next run over the same OUT: removes the leftovers (putting the old OUT back first if it was aside)
    assert sorted(path.name for path in parent.iterdir()) == ["out"]
    assert tree(parent / "out") == reference_outputs[tool]


@needs_fork
def test_a_run_after_a_kill_between_the_renames_puts_the_old_out_back(checkpoints, tmp_path, caplog):
    parent = tmp_path / "parent"
    old = old_output(parent)
    pid, status = fork_run(runner("convert", checkpoints, parent / "out", overwrite=True), lambda: kill_at_rename(2))
    assert killed(status) and not (parent / "out").exists()
    with caplog.at_level("WARNING", logger="llava_ext.convert.io"):
        with pytest.raises(FileExistsError, match="out already exists; choose another output directory or pass"):
            convert_checkpoint(checkpoints["single"], parent / "out", progress=False)  # no --overwrite
    assert sorted(path.name for path in parent.iterdir()) == ["out"] and tree(parent / "out") == old
    assert re.search(rf"Put {re.escape(str(parent / 'out'))} back from .*\.out\.{pid}\.\w+\.old: a run replacing it "
                     rf"\(process {pid}\) was killed midway", caplog.text)
    assert re.search(rf"Removed .*\.out\.{pid}\.\w+\.partial, left by a llava-ext run \(process {pid}\) killed while "
                     "writing", caplog.text)


@needs_fork
@pytest.mark.parametrize("tool", ["convert", "export", "merge-lora"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_kills_at_random_times_leave_no_complete_looking_out(
    checkpoints, reference_outputs, tmp_path, tool, overwrite
):
    """SIGKILL from outside at times spread over a whole (slowed) run; the next run tidies after each."""
    parent = tmp_path / "parent"
    run = runner(tool, checkpoints, parent / "out", overwrite)
    # slowed where the output is written, so that most kills land while a temporary directory exists
    setup = (lambda: slow_merged_weights_save(0.2)) if tool == "merge-lora" else (lambda: slow_tensor_writes(0.001))
    start = time.monotonic()
    assert fork_run(run, setup)[1] == 0  # one whole run, to time it
    duration = time.monotonic() - start
    shutil.rmtree(parent)
    states = []
    for index in range(KILLS):
        parent.mkdir(exist_ok=True)
        old = old_output(parent) if overwrite else None
        pid, status = fork_run(run, setup, kill_after=duration * (index + 0.5) / KILLS)
        states.append(state_after_kill(parent, pid, old, reference_outputs[tool]) if killed(status) else "finished")
        leftovers = sorted(path for path in parent.iterdir() if path.name != "out")
        assert sorted(clean_interrupted_writes(parent / "out")) == leftovers  # what the next run does first
        assert [path.name for path in parent.iterdir()] == (["out"] if (parent / "out").exists() else [])
        shutil.rmtree(parent)
    assert any("partial" in state for state in states), f"no kill landed while writing: {states}"


@pytest.fixture(scope="module")
def large_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A 64M-parameter (256 MB) checkpoint and a LoRA adapter on it, so writing OUT takes a noticeable time."""
    root = tmp_path_factory.mktemp("large")
    text_config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=8, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
    config = LlavaExtConfig(**{**tiny_llava_config().to_dict(), "text_config": text_config.to_dict()})
    paths = {"single": root / "large", "adapter": root / "large-lora"}
    LlavaExtForConditionalGeneration(config).save_pretrained(paths["single"])
    base = AutoModelForImageTextToText.from_pretrained(paths["single"], trust_remote_code=True)
    apply_lora(base, ModelArguments(model_name_or_path=str(paths["single"]), lora_enable=True, lora_r=4,
                                    lora_alpha=8)).save_pretrained(paths["adapter"])
    for path in paths.values():
        make_processor().save_pretrained(path)
    return paths


def cli_command(tool: str, checkpoints, out: Path) -> list[str]:
    source = checkpoints["adapter" if tool == "merge-lora" else "single"]
    return [sys.executable, "-m", "llava_ext.cli", tool, str(source), str(out), "--overwrite"]


@needs_fork
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["convert", "export", "merge-lora"])
def test_the_cli_killed_at_random_times_leaves_no_complete_looking_out(large_checkpoints, tmp_path, tool):
    """`llava-ext TOOL SRC OUT --overwrite` in a subprocess, SIGKILLed at times from its start (mostly during
    imports) and at delays after its temporary directory appears (while writing); about 2 minutes per tool."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference" / "out"
    start = time.monotonic()
    process = subprocess.Popen(cli_command(tool, large_checkpoints, reference), env=env, stderr=subprocess.DEVNULL)
    while not any(reference.parent.glob(".out.*.partial")) and process.poll() is None:
        time.sleep(0.001)
    writing_starts = time.monotonic() - start
    while not reference.exists() and process.poll() is None:
        time.sleep(0.001)
    writing = time.monotonic() - start - writing_starts  # until OUT is renamed into place
    assert process.wait() == 0
    new = tree(reference)

    parent = tmp_path / "parent"
    delays = [("from start", writing_starts * fraction) for fraction in (0.5, 0.95)]
    delays += [("writing", writing * fraction) for fraction in (0.0, 0.25, 0.5, 0.75, 1.0)]
    states = []
    for phase, delay in delays:
        old = old_output(parent)
        process = subprocess.Popen(cli_command(tool, large_checkpoints, parent / "out"), env=env,
                                   stderr=subprocess.DEVNULL)
        if phase == "writing":
            while not any(parent.glob(f".out.{process.pid}.*.partial")) and process.poll() is None:
                time.sleep(0.001)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        states.append(state_after_kill(parent, process.pid, old, new) if process.returncode < 0 else "finished")
        clean_interrupted_writes(parent / "out")  # what the next run does first
        assert [path.name for path in parent.iterdir()] == (["out"] if (parent / "out").exists() else [])
        shutil.rmtree(parent)
    assert sum("partial" in state for state in states) >= 3, states


@needs_fork
def test_only_leftovers_of_dead_processes_for_this_out_are_removed(tmp_path, caplog):
    dead, _ = fork_run(lambda: None)  # a process id that no longer runs
    removed = [f".out.{dead}.x1y2z3_4.partial", f".out.{dead}.x1y2z3_5.old"]
    kept = [f".out.{os.getpid()}.x1y2z3_6.partial",  # a run in progress (this process)
            f".other.{dead}.x1y2z3_7.partial", f".out.tar.{dead}.x1y2z3_8.partial",  # other outputs' (OUT "out.tar")
            ".out.backup", "out"]
    for name in removed + kept:
        (tmp_path / name).mkdir()
    (tmp_path / removed[0] / "model.safetensors").write_bytes(b"half")
    with caplog.at_level("WARNING", logger="llava_ext.convert.io"):
        assert sorted(clean_interrupted_writes(tmp_path / "out")) == [tmp_path / name for name in removed]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)
    assert caplog.text.count("left by a llava-ext run") == 2


def test_merge_lora_refuses_an_existing_output_unless_overwrite(checkpoints, reference_outputs, tmp_path):
    old = old_output(tmp_path)
    with pytest.raises(SystemExit, match=r"llava-ext merge-lora: error: .*out already exists; choose another output "
                                         r"directory or pass --overwrite"):
        main(["merge-lora", str(checkpoints["adapter"]), str(tmp_path / "out")])
    assert tree(tmp_path / "out") == old
    main(["merge-lora", str(checkpoints["adapter"]), str(tmp_path / "out"), "--overwrite"])
    assert tree(tmp_path / "out") == reference_outputs["merge-lora"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("tool", ["convert", "merge-lora"])
def test_a_failed_overwrite_leaves_the_old_out_intact(checkpoints, tmp_path, monkeypatch, tool):
    """A full disk halfway through writing the weights: the error surfaces, OUT is the old one, nothing else is left."""
    old = old_output(tmp_path)
    if tool == "convert":
        real = convert_io._write_safetensors_file

        def write_then_fail(path, plan, on_tensor):
            if path.name.startswith("model-00002"):
                raise OSError(28, "No space left on device")
            real(path, plan, on_tensor)

        monkeypatch.setattr(convert_io, "_write_safetensors_file", write_then_fail)
    else:
        import transformers.modeling_utils as modeling_utils

        def save_half_then_fail(tensors, filename, *args, **kwargs):
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(modeling_utils, "safe_save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        runner(tool, checkpoints, tmp_path / "out", overwrite=True)()
    assert tree(tmp_path / "out") == old
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------- chat's and train's loaders (follow-up)
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "0", "conversations": [{"from": "human", "value": "Hi?"},
                                                               {"from": "gpt", "value": "Hello."}]}]))
    return path


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("loader", ["chat", "train"])
def test_chat_and_train_loaders_name_the_broken_file(checkpoints, tmp_path, loader, case):
    broken, message = break_checkpoint(checkpoints, case, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        if loader == "chat":
            load_model_and_processor(str(broken), device="cpu")
        else:
            build_trainer(ModelArguments(model_name_or_path=str(broken)),
                          DataArguments(data_path=str(data_file(tmp_path))),
                          TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none"))
