"""A llava_ext checkpoint loads with trust_remote_code in a Python that cannot import llava_ext."""

import subprocess
import sys
import textwrap

import torch
from conftest import IMAGE_TOKEN_ID, NUM_PATCHES, tiny_llava_config

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration

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
        result = {
            "config_class": type(config).__name__,
            "model_class": type(model).__name__,
            "causal_class": type(causal).__name__,
            "base_class": type(base).__name__,
            "modules": sorted({type(m).__module__.split(".")[0] for m in (config, model, base)}),
            "logits": model(**inputs).logits,
            "causal_logits": causal(**inputs).logits,
            "hidden": base(**inputs).last_hidden_state,
        }
    torch.save(result, out_path)
    """
)


def test_trust_remote_code_round_trip_without_llava_ext(tmp_path):
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict())).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    code_files = sorted(path.name for path in (tmp_path / "checkpoint").glob("*.py"))
    assert code_files == ["configuration_llava_ext.py", "modeling_llava_ext.py", "vision.py"]
    for path in (tmp_path / "checkpoint").glob("*.py"):  # the code a user has to trust stays small
        imports = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert all(
            line.split()[1].split(".")[0] in {"torch", "transformers", ".", "__future__"}
            or line.split()[1].startswith(".")
            for line in imports
        ), imports

    input_ids = torch.tensor([[1, 40] + [IMAGE_TOKEN_ID] * NUM_PATCHES + [50, 51, 52]])
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_hidden = model.model(**inputs).last_hidden_state

    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["config_class"] == "LlavaExtConfig"
    assert result["model_class"] == result["causal_class"] == "LlavaExtForConditionalGeneration"
    assert result["base_class"] == "LlavaExtModel"
    assert result["modules"] == ["transformers_modules"]  # the checkpoint's copy, not an installed llava_ext
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["causal_logits"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["hidden"], expected_hidden, rtol=0, atol=1e-6)
