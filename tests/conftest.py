"""Shared tiny fixtures: vision hidden 32, 2-3 layers, image 32 / patch 8, a character-level tokenizer (vocab 128),
and `hub`, HfApi with its network calls recorded instead of made."""

import importlib.util
import os
import string
from pathlib import Path

# transformers 5.25 turns `use_kernels` on in every from_pretrained and requires the `kernels` package for it; where
# that is not installed (an index without kernels>=0.19.1, `nox -s next`), the tests switch hub kernels off, before
# transformers is imported (5.24 reads the switch at import). The package itself never does this.
HUB_KERNELS_SWITCHED_OFF = importlib.util.find_spec("kernels") is None and "USE_HUB_KERNELS" not in os.environ
if HUB_KERNELS_SWITCHED_OFF:
    os.environ["USE_HUB_KERNELS"] = "NO"

import huggingface_hub  # noqa: E402 (after the kernels switch)
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_ext.processing_llava_ext import image_assistant_masks_supported

# Releases that misalign assistant masks after image-token expansion (5.17): llava_ext refuses them there (tested in
# test_processing_llava_ext), so tests that train on image conversations' masks cannot run on such a release.
needs_image_assistant_masks = pytest.mark.skipif(
    not image_assistant_masks_supported(),
    reason="this transformers misaligns assistant masks after image expansion; llava_ext refuses (needs 5.2x)",
)

# The only time limit a test may set: a guard against a hang, never a speed limit. A subprocess, server or child that
# runs this long has hung; a slow or shared machine takes a few minutes at most for anything in the suite.
HANG_GUARD_S = 900

VOCAB_SIZE = 128
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(5)
IMAGE_SIZE, PATCH_SIZE = 32, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16

VISION = {
    "clip": lambda: CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    ),
    "siglip": lambda: SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    ),
}
TEXT = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}


def tiny_llava_config(vision="clip", text="llama", **kwargs) -> LlavaConfig:
    """A transformers `LlavaConfig` (the reference's) with tiny towers; llava_ext builds its own from `.to_dict()`."""
    text_config = TEXT[text](
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB_SIZE, max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kwargs.setdefault("image_token_index", IMAGE_TOKEN_ID)
    kwargs.setdefault("image_seq_length", NUM_PATCHES)
    return LlavaConfig(vision_config=VISION[vision](), text_config=text_config, **kwargs)


def write_color_dataset(root: Path) -> None:
    """Four 32x32 single-colour images in `root` and `root/data.json`, their LLaVA-format conversations."""
    import json

    from PIL import Image

    records = []
    for index, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        Image.new("RGB", (32, 32), color).save(root / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": f"color {index}"}]})
    (root / "data.json").write_text(json.dumps(records))


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII + newline, BOS prepended, `<image>` a special token."""
    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hub(monkeypatch) -> list:
    """HfApi with its network calls replaced by recorders; uploads keep each file's bytes at upload time."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a subprocess that must not see this one's (no llava_ext on PATH, a private modules cache,
    no Hub), keeping only the test run's hub-kernels switch."""
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if "USE_HUB_KERNELS" in os.environ:
        env["USE_HUB_KERNELS"] = os.environ["USE_HUB_KERNELS"]
    return env


HUB_KERNELS_NOTE = (
    "hub kernels: the `kernels` package is not installed, so tests/conftest.py set USE_HUB_KERNELS=NO for this run "
    "(transformers >= 5.25 would otherwise raise 'Kernels are not available' in from_pretrained); what kernels change "
    "is not tested here"
)


def pytest_report_header(config) -> list[str]:
    """Say in the run's header when hub kernels were switched off for it (see HUB_KERNELS_SWITCHED_OFF)."""
    return [HUB_KERNELS_NOTE] if HUB_KERNELS_SWITCHED_OFF else []


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """And again beside the result, which `-q` runs (whose header is hidden) show too."""
    if HUB_KERNELS_SWITCHED_OFF:
        terminalreporter.write_line(HUB_KERNELS_NOTE)
