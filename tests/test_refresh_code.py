"""`llava-ext refresh-code`: a llava_ext 0.1.0 checkpoint gets the installed code, atomically, weights untouched.

The fixture was saved by llava_ext 0.1.0 on transformers 5.23 (tests/fixtures/make_v010_fixture.py); its code breaks
on newer transformers. `expected.pt` holds what 0.1.0 computed, so the refreshed checkpoint, loaded through
trust_remote_code where llava_ext cannot be imported, is compared with an independent, frozen result.
"""

import difflib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, isolated_env

import llava_ext
import llava_ext.convert.refresh as refresh
from llava_ext.cli import main
from llava_ext.convert import refresh_checkpoint_code
from llava_ext.modeling_llava_ext import AUTO_MAP

FIXTURE = Path(__file__).parent / "fixtures" / "llava_ext-0.1.0-tiny"
PROMPT = "USER: <image>\nWhat colour? ASSISTANT:"
PACKAGE_DIR = Path(llava_ext.__file__).parent
MODEL_CODE = ["configuration_llava_ext.py", "modeling_llava_ext.py", "vision.py"]
PROCESSOR_CODE = ["image_processing_llava_ext.py", "processing_llava_ext.py"]
UNCHANGED = ["model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"]

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import PIL.Image
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint, expected_path, image_path, prompt, out_path = sys.argv[1:]
    expected = torch.load(expected_path)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    inputs = processor(text=prompt, images=PIL.Image.open(image_path), return_tensors="pt")
    frozen = {"input_ids": expected["input_ids"], "pixel_values": expected["pixel_values"]}
    with torch.no_grad():
        logits = model(**frozen).logits
        tokens = model.generate(**frozen, max_new_tokens=8, do_sample=False)[0, frozen["input_ids"].shape[1]:]
    objects = (model, processor, processor.image_processor)
    torch.save({
        "modules": sorted({type(obj).__module__.split(".")[0] for obj in objects}),
        "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits, "tokens": tokens,
    }, out_path)
    """
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """{relative path: (bytes, inode, mode)} of every file, and the directory's own mode under '.'."""
    files = {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mode)
             for p in directory.rglob("*") if p.is_file()}
    return {**files, ".": (b"", directory.stat().st_ino, directory.stat().st_mode)}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A private copy of the 0.1.0 checkpoint (the fixture itself is never written), alone in its parent."""
    path = tmp_path / "parent" / "llava-tiny-0.1.0"
    shutil.copytree(FIXTURE / "checkpoint", path)
    return path



# ----------------------------------------------------------------------------------------------------------- in place
def test_in_place_refresh_installs_the_code_and_keeps_the_weights(checkpoint, caplog):
    (checkpoint / "notes.py").write_text("# the user's own file\n")  # not ours: carried over untouched
    (checkpoint / "extra").mkdir()
    (checkpoint / "extra" / "eval.txt").write_text("accuracy 0.5\n")
    before = tree(checkpoint)
    weights_sha = sha256(FIXTURE / "checkpoint" / "model.safetensors")
    assert (checkpoint / "modeling_llava_ext.py").read_bytes() != (PACKAGE_DIR / "modeling_llava_ext.py").read_bytes()

    with caplog.at_level(logging.INFO, logger="llava_ext.convert.refresh"):
        out = refresh_checkpoint_code(checkpoint)

    assert out == checkpoint
    for name in MODEL_CODE + PROCESSOR_CODE:
        assert (checkpoint / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), name
    assert "modeling_llava_ext.py: replaced" in caplog.text
    config = json.loads((checkpoint / "config.json").read_text())
    assert {key: config["auto_map"][key] for key in AUTO_MAP} == AUTO_MAP
    original_config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "auto_map"} == {
        k: v for k, v in original_config.items() if k != "auto_map"
    }

    after = tree(checkpoint)
    assert sha256(checkpoint / "model.safetensors") == weights_sha
    for name in UNCHANGED + ["notes.py", "extra/eval.txt"]:
        assert after[name] == before[name], name  # same bytes, same inode (a hard link), same mode
    assert after["."][2] == before["."][2]  # the directory keeps its permissions
    assert sorted(after) == sorted(before)  # no file added or lost
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]  # no temp or backup dir left


def test_refreshed_checkpoint_loads_without_llava_ext_and_matches_0_1_0(checkpoint, tmp_path):
    refresh_checkpoint_code(checkpoint)
    env = isolated_env(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(checkpoint), str(FIXTURE / "expected.pt"),
         str(FIXTURE / "image.png"), PROMPT, str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    expected = torch.load(FIXTURE / "expected.pt")
    assert result["modules"] == ["transformers_modules"]  # the refreshed copies, not an installed llava_ext
    assert torch.equal(result["input_ids"], expected["input_ids"])
    torch.testing.assert_close(result["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    torch.testing.assert_close(result["logits"], expected["logits"], rtol=0, atol=1e-5)
    assert result["tokens"].tolist() == expected["greedy_tokens"].tolist()


def test_a_symlinked_checkpoint_is_refreshed_where_it_points(checkpoint, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(checkpoint, target_is_directory=True)
    weights_inode = (checkpoint / "model.safetensors").stat().st_ino
    assert refresh_checkpoint_code(link) == link
    assert link.is_symlink() and link.resolve() == checkpoint  # the link is kept, not replaced by a directory
    assert (checkpoint / "vision.py").read_bytes() == (PACKAGE_DIR / "vision.py").read_bytes()
    assert (checkpoint / "model.safetensors").stat().st_ino == weights_inode
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


def test_a_failure_before_the_swap_leaves_the_original_untouched(checkpoint, monkeypatch):
    before = tree(checkpoint)
    carried = []

    def link_then_fail(src, dst):  # the first unchanged file is linked, the second hits a full disk
        if carried:
            raise OSError(28, "No space left on device")
        carried.append(src)
        os.link(src, dst)
        return dst

    monkeypatch.setattr(refresh, "_link_or_copy", link_then_fail)
    with pytest.raises(OSError, match="No space left"):
        refresh_checkpoint_code(checkpoint)
    assert carried  # it failed halfway through building the new directory, not before starting
    assert tree(checkpoint) == before
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


@pytest.mark.parametrize("failing_rename", [1, 2], ids=["moving-the-original-aside", "moving-the-new-one-in"])
def test_a_failed_rename_leaves_the_original_in_place(checkpoint, monkeypatch, failing_rename):
    before, replace, calls = tree(checkpoint), os.replace, []

    def flaky_replace(src, dst):
        calls.append(src)
        if len(calls) == failing_rename:
            raise OSError(5, "Input/output error")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="Input/output error"):
        refresh_checkpoint_code(checkpoint)
    monkeypatch.undo()
    assert checkpoint.is_dir() and tree(checkpoint) == before
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


def test_auto_maps_are_merged_and_only_our_processor_references_move(checkpoint):
    config_path, tokenizer_path = checkpoint / "config.json", checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {  # an older auto_map without the generation entries, plus someone else's class
        "AutoConfig": "configuration_llava_ext.LlavaExtConfig",
        "AutoModel": "modeling_llava_ext.LlavaExtModel",
        "AutoModelForSequenceClassification": "scoring_head.LlavaScorer",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads(tokenizer_path.read_text())
    tokenizer_config["auto_map"] = {
        "AutoProcessor": "image_processing_llava_ext.LlavaExtProcessor",  # our class under a module it left
        "AutoTokenizer": ["custom_tokenizer.SlowTokenizer", None],  # not ours: kept
    }
    tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    old_config_text, old_processor_text = config_path.read_text(), (checkpoint / "processor_config.json").read_text()

    refresh_checkpoint_code(checkpoint)

    assert json.loads(config_path.read_text())["auto_map"] == {
        **AUTO_MAP, "AutoModelForSequenceClassification": "scoring_head.LlavaScorer"
    }
    changed = [line for line in difflib.ndiff(old_config_text.splitlines(), config_path.read_text().splitlines())
               if line[:1] in "+-"]
    assert changed == [  # the missing entries added, every other byte as it was
        '+     "AutoModelForCausalLM": "modeling_llava_ext.LlavaExtForConditionalGeneration",',
        '+     "AutoModelForImageTextToText": "modeling_llava_ext.LlavaExtForConditionalGeneration",',
        '+     "AutoModelForMultimodalLM": "modeling_llava_ext.LlavaExtForConditionalGeneration",',
        '+     "AutoModelForPreTraining": "modeling_llava_ext.LlavaExtForConditionalGeneration",',
    ]
    assert json.loads(tokenizer_path.read_text())["auto_map"] == {
        "AutoProcessor": "processing_llava_ext.LlavaExtProcessor",
        "AutoTokenizer": ["custom_tokenizer.SlowTokenizer", None],
    }
    assert (checkpoint / "processor_config.json").read_text() == old_processor_text  # already current: same bytes


# ------------------------------------------------------------------------------------------------ out_dir and errors
def test_out_dir_gets_an_independent_copy_and_is_not_overwritten_by_default(checkpoint, tmp_path):
    before = tree(checkpoint)
    out = tmp_path / "refreshed"
    assert refresh_checkpoint_code(checkpoint, out) == out
    assert tree(checkpoint) == before  # the source is not touched
    assert (out / "modeling_llava_ext.py").read_bytes() == (PACKAGE_DIR / "modeling_llava_ext.py").read_bytes()
    assert sha256(out / "model.safetensors") == sha256(checkpoint / "model.safetensors")
    assert (out / "model.safetensors").stat().st_ino != (checkpoint / "model.safetensors").stat().st_ino
    with pytest.raises(FileExistsError, match="already exists; .* pass --overwrite"):
        refresh_checkpoint_code(checkpoint, out)
    refresh_checkpoint_code(checkpoint, out, overwrite=True)
    with pytest.raises(ValueError, match="is inside the checkpoint .*; choose a directory outside it"):
        refresh_checkpoint_code(checkpoint, checkpoint / "refreshed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent", "refreshed"]


def test_a_stock_llava_checkpoint_is_refused_before_writing(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["auto_map"]
    config["model_type"], config["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    before = tree(checkpoint)
    with pytest.raises(ValueError, match=r"model_type='llava' .* stock transformers .* `llava-ext convert "):
        refresh_checkpoint_code(checkpoint)
    config["model_type"] = "llama"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ValueError, match=r"model_type='llama' and auto_map=None; refresh-code updates llava_ext"):
        refresh_checkpoint_code(checkpoint)
    assert {k: v for k, v in tree(checkpoint).items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


def test_a_hub_id_needs_an_output_dir_or_a_push(tmp_path):
    with pytest.raises(SystemExit) as raised:
        main(["refresh-code", "me/llava-tiny-ext"])
    message = str(raised.value.code)
    assert message.startswith("llava-ext refresh-code: error: 'me/llava-tiny-ext' is not a local directory")
    assert "cannot be refreshed in place: pass out_dir (--output-dir) or push_to_hub_repo (--push-to-hub)" in message


# --------------------------------------------------------------------------------------------------------------- cli
def test_cli_refreshes_in_place_and_pushes(checkpoint, hub, capsys):
    weights = (FIXTURE / "checkpoint" / "model.safetensors").read_bytes()
    assert main(["refresh-code", str(checkpoint), "--push-to-hub", "me/llava-tiny-ext", "--private",
                 "--revision", "dev"]) == 0
    assert capsys.readouterr().out == (
        f"Refreshed checkpoint: {checkpoint} (pushed to https://huggingface.co/me/llava-tiny-ext)\n"
    )
    assert [call[0] for call in hub] == ["create_repo", "create_branch", "upload_folder"]
    assert hub[0][2]["private"] is True and hub[1][2]["branch"] == "dev"
    upload = hub[2][2]
    assert upload["repo_id"] == "me/llava-tiny-ext" and upload["revision"] == "dev"
    assert Path(upload["folder_path"]) == checkpoint
    for name in MODEL_CODE + PROCESSOR_CODE:
        assert upload["files"][name] == (PACKAGE_DIR / name).read_bytes(), name
    assert upload["files"]["model.safetensors"] == weights
    assert set(upload["files"]) == {p.name for p in (FIXTURE / "checkpoint").iterdir()}


def test_cli_pushes_a_hub_checkpoint_from_a_staging_directory(checkpoint, hub, monkeypatch, capsys):
    before = tree(checkpoint)
    monkeypatch.setattr(refresh, "resolve_source", lambda source, what="checkpoint": checkpoint)  # the "snapshot"
    assert main(["refresh-code", "someone/llava-tiny-0.1.0", "--push-to-hub", "me/llava-tiny-ext"]) == 0
    assert capsys.readouterr().out == "Refreshed checkpoint pushed to https://huggingface.co/me/llava-tiny-ext\n"
    upload = hub[-1][2]
    assert upload["files"]["modeling_llava_ext.py"] == (PACKAGE_DIR / "modeling_llava_ext.py").read_bytes()
    assert upload["files"]["model.safetensors"] == before["model.safetensors"][0]
    assert upload["commit_message"] == "Upload llava-tiny-0.1.0 with llava-ext"
    assert not Path(upload["folder_path"]).exists()  # the staging directory is gone
    assert tree(checkpoint) == before  # the "snapshot" is never refreshed in place


def test_a_refresh_killed_between_its_renames_is_put_back_by_the_next_run(checkpoint):
    """SIGKILL after the original was moved aside and before the new one moved in: the next run restores, refreshes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    moved_aside = checkpoint.parent / f".{checkpoint.name}.{int(dead.stdout)}.abcd1234.old"
    moved_aside.mkdir()
    checkpoint.rename(moved_aside / "old")
    weights_before = hashlib.sha256((moved_aside / "old" / "model.safetensors").read_bytes()).hexdigest()

    refresh_checkpoint_code(checkpoint)

    assert [path.name for path in checkpoint.parent.iterdir()] == [checkpoint.name]
    assert hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest() == weights_before
    installed = Path(llava_ext.__file__).parent / "modeling_llava_ext.py"
    assert (checkpoint / "modeling_llava_ext.py").read_bytes() == installed.read_bytes()


# ------------------------------------------------------------------------------------------- NeXT and OneVision
ANYRES_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import torch
    from transformers import AutoModelForImageTextToText

    checkpoint, inputs_path, out_path = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**torch.load(inputs_path)).logits
    torch.save({"module": type(model).__module__.split(".")[0], "class": type(model).__name__, "logits": logits},
               out_path)
    """
)


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_anyres_checkpoints_get_their_own_family_code(family, tmp_path):
    """A NeXT / OneVision checkpoint whose shipped model code is stale (here: broken) and whose auto_map is partial
    gets its own family's installed modules and auto_map, drops a module it does not need, and loads without
    llava_ext with the logits of the model that saved it."""
    from test_export_next import FAMILIES, PROMPTS, images

    from llava_ext.modeling_llava_ext_next import NEXT_AUTO_MAP
    from llava_ext.modeling_llava_ext_onevision import ONEVISION_AUTO_MAP

    expected_map = {"next": NEXT_AUTO_MAP, "onevision": ONEVISION_AUTO_MAP}[family]
    path = tmp_path / "checkpoint"
    model, processor = FAMILIES[family][0](path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    modeling = path / f"modeling_llava_ext_{family}.py"
    modeling.write_text("raise ImportError('the stale code of an older llava_ext')\n")
    # NeXT never imports OneVision's module (OneVision builds on NeXT's: there it is needed, and rewritten)
    other = path / ("modeling_llava_ext_onevision.py" if family == "next" else "modeling_llava_ext_next.py")
    other.write_text("# stale\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": config["auto_map"]["AutoConfig"]}
    (path / "config.json").write_text(json.dumps(config))

    assert main(["refresh-code", str(path)]) == 0

    assert modeling.read_bytes() == (PACKAGE_DIR / modeling.name).read_bytes()
    if family == "next":
        assert not other.exists()
    else:
        assert other.read_bytes() == (PACKAGE_DIR / other.name).read_bytes()
    assert json.loads((path / "config.json").read_text())["auto_map"] == expected_map
    inputs = processor(text=list(PROMPTS), images=images(), return_tensors="pt", padding=True)
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    completed = subprocess.run(
        [sys.executable, "-c", ANYRES_REMOTE_SCRIPT, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert (result["module"], result["class"]) == ("transformers_modules", type(model).__name__)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_a_stock_anyres_checkpoint_is_refused_naming_convert(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"model_type='{model_type}'.*llava-ext convert"):
        refresh_checkpoint_code(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
