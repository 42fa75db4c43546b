"""The Hub side of a written checkpoint: its model card (README.md) and the upload (`push_to_hub`)."""

import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ description }}

## Usage

```python
{{ usage }}
```
"""
USAGE_REMOTE_CODE = """import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{repo}"
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=torch.float16)
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "path": "image.jpg"}}, {{"type": "text", "text": "What is in this image?"}}]}}]
# one call renders the chat template (which starts with the BOS) and tokenizes it without adding a second one
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device, torch.float16)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
USAGE_STOCK = USAGE_REMOTE_CODE.replace(", trust_remote_code=True", "")


def model_card(base_model: str | None, name: str, description: str, usage: str) -> ModelCard:
    """The card written as README.md: metadata, `description`, and `usage` (with `{repo}` set to `name`)."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        tags=["llava", "llava_ext", "image-text-to-text"],
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=name,
        description=description,
        usage=usage.format(repo=name),
    )


def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Upload a converted directory to the Hub in one commit (`HfApi.create_repo` + `upload_folder`).

    Args:
        out_dir (`str` or `os.PathLike`): the directory to upload.
        repo_id (`str`): the model repo, `owner/name`; created if missing.
        private (`bool`, *optional*, defaults to `False`): create the repo private (an existing repo keeps its setting).
        revision (`str`, *optional*): the branch to commit to, created from main if missing.
        commit_message (`str`, *optional*): defaults to "Upload <dir name> with llava-ext".
        token (`str`, *optional*): defaults to `HF_TOKEN` or the stored `hf auth login` token.

    Returns:
        huggingface_hub's `CommitInfo` of the upload.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        raise FileNotFoundError(f"{out_dir} holds no config.json; convert or export a checkpoint into it first.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=out_dir,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {out_dir.name} with llava-ext",
    )


__all__ = ["USAGE_REMOTE_CODE", "USAGE_STOCK", "model_card", "push_to_hub"]
