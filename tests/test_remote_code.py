"""A llava_ext checkpoint loads with trust_remote_code in a Python that cannot import llava_ext.

The files copied next to the weights run on transformers releases we have never seen, so they may import only
transformers' stable public names; the nox sessions run this file on the floor and the newest release.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, IMAGE_TOKEN_ID, NUM_PATCHES, isolated_env, tiny_llava_config

import llava_ext
from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration

SHIPPED_FILES = (
    "configuration_llava_ext.py",
    "modeling_llava_ext.py",
    "vision.py",
    "processing_llava_ext.py",
    "image_processing_llava_ext.py",
)
# transformers' stable public surface: the top-level package and the output dataclasses
ALLOWED_TRANSFORMERS_MODULES = {"transformers", "transformers.modeling_outputs"}
ALLOWED_THIRD_PARTY = {"torch", "numpy", "PIL"}  # torch, and transformers' own vision dependencies

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM

    checkpoint, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    causal = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        # a deep copy of a model that has decoded compiled must decode with its own weights, not the original's
        from transformers import CompileConfig
        import copy
        compile_config = CompileConfig(backend="eager", mode=None)
        compile_config._compile_all_devices = True
        static = dict(inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
        model.generate(**static, compile_config=compile_config)
        other = copy.deepcopy(model)
        other.lm_head.weight.copy_(other.lm_head.weight.roll(1, dims=0))
        copy_tokens = {
            "compiled": other.generate(**static, compile_config=compile_config),
            "eager": other.generate(**static, disable_compile=True),
            "original": model.generate(**static, disable_compile=True),
        }
        result = {
            "config_class": type(config).__name__,
            "model_class": type(model).__name__,
            "causal_class": type(causal).__name__,
            "base_class": type(base).__name__,
            "modules": sorted({type(m).__module__.split(".")[0] for m in (config, model, base)}),
            "logits": model(**inputs).logits,
            "causal_logits": causal(**inputs).logits,
            "hidden": base(**inputs).last_hidden_state,
            "tokens": tokens,
            "copy_tokens": copy_tokens,
        }
    torch.save(result, out_path)
    """
)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in a file, nested ones included; relative imports are skipped."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            found.append((node.lineno, "<dynamic import>"))
    return found


def disallowed_import(module: str) -> bool:
    top = module.split(".")[0]
    if top == "transformers":
        return module not in ALLOWED_TRANSFORMERS_MODULES
    return top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names


@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_shipped_files_import_only_stable_public_names(name):
    path = Path(llava_ext.__file__).parent / name
    bad = [f"{name}:{line}: {module}" for line, module in imported_modules(path) if disallowed_import(module)]
    assert not bad, "shipped checkpoint code imports outside the stable public set:\n" + "\n".join(bad)


def test_the_import_check_catches_an_internal_import(tmp_path):
    """The lister sees nested and dynamic imports, so the check above can fail."""
    source = tmp_path / "bad.py"
    source.write_text(
        "from transformers import AutoModel\nimport importlib\n"
        "def f():\n    from transformers.models.llava.modeling_llava import LlavaModel\n"
        "    return importlib.import_module('transformers.cache_utils')\n"
    )
    flagged = [module for _, module in imported_modules(source) if disallowed_import(module)]
    assert flagged == ["transformers.models.llava.modeling_llava", "<dynamic import>"]


def test_trust_remote_code_round_trip_without_llava_ext(tmp_path):
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    code_files = sorted(path.name for path in (tmp_path / "checkpoint").glob("*.py"))
    assert code_files == ["configuration_llava_ext.py", "modeling_llava_ext.py", "vision.py"]

    input_ids = torch.tensor([[1, 40] + [IMAGE_TOKEN_ID] * NUM_PATCHES + [50, 51, 52]])
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_hidden = model.model(**inputs).last_hidden_state
        expected_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    env = isolated_env(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["config_class"] == "LlavaExtConfig"
    assert result["model_class"] == result["causal_class"] == "LlavaExtForConditionalGeneration"
    assert result["base_class"] == "LlavaExtModel"
    assert result["modules"] == ["transformers_modules"]  # the checkpoint's copy, not an installed llava_ext
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["causal_logits"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["hidden"], expected_hidden, rtol=0, atol=1e-5)
    assert torch.equal(result["tokens"], expected_tokens)
    copy_tokens = result["copy_tokens"]  # the shipped code compiles its own forward for a deep copy
    assert torch.equal(copy_tokens["compiled"], copy_tokens["eager"])
    assert not torch.equal(copy_tokens["eager"], copy_tokens["original"])
    assert "FutureWarning" not in completed.stderr  # no deprecated transformers API on the installed release
