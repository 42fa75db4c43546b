"""Training data for LLaVA: a lazy conversation dataset and a collator that trains on assistant answers only.

Two on-disk formats are read, both as one JSON list or as JSON Lines:

- the original LLaVA format (`llava_v1_5_mix665k.json`)::

      {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
       "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                         {"from": "gpt", "value": "The bus is white and red."}]}

- the messages format (transformers chat messages, images listed in the order they appear)::

      {"id": "a1", "images": ["cat.png"],
       "messages": [{"role": "user", "content": "<image>\\nWhat is this?"},
                    {"role": "assistant", "content": "A cat."}]}

  where `content` is a string (with `<image>` placeholders) or a list of `{"type": "text"|"image", ...}` blocks.

Both become transformers chat messages with the PIL images in their `{"type": "image"}` blocks. The collator renders
them with the processor's chat template and derives labels from the template's `{% generation %}` mask:

    <s> USER: <image>x576 \\n What is this? ASSISTANT: A cat.</s> USER: ...
    -100 .................................................  A cat.</s>  -100 ...   (labels)
"""

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # the label value transformers' losses skip
IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(ValueError):
    """A training sample that cannot be used as given (missing image, placeholders cut by truncation...)."""


def load_records(data_path: str | os.PathLike) -> list[dict]:
    """Read a JSON list or a JSON Lines file of samples."""
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist; give a .json (list) or .jsonl file of samples.")
    with path.open(encoding="utf-8") as handle:
        text = handle.read()
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _split_placeholders(text: str) -> list[dict]:
    """'<image>\\nHi' -> [{"type": "image"}, {"type": "text", "text": "Hi"}] (one newline after a placeholder dropped)."""
    blocks = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            blocks.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece  # the chat template puts its own separator
        if piece.strip():
            blocks.append({"type": "text", "text": piece.strip()})
    return blocks


def normalize_record(record: dict, index: int) -> dict:
    """One sample in either format -> `{"id", "messages" (content as blocks), "images" (paths)}`."""
    sample_id = str(record.get("id", index))
    if "conversations" in record:
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        messages = []
        for turn in record["conversations"]:
            role = LLAVA_ROLES.get(turn.get("from"))
            if role is None:
                raise SampleError(
                    f"Sample {sample_id!r}: a turn has from={turn.get('from')!r}; the LLaVA format uses 'human', "
                    "'gpt' (or 'system')."
                )
            messages.append({"role": role, "content": turn["value"]})
    elif "messages" in record:
        images = list(record.get("images") or [])
        messages = record["messages"]
    else:
        raise SampleError(
            f"Sample {sample_id!r} has keys {sorted(record)}; expected 'conversations' (LLaVA format) or "
            "'messages' (+ optional 'images')."
        )

    normalized = []
    for message in messages:
        content = message["content"]
        blocks = _split_placeholders(content) if isinstance(content, str) else [dict(block) for block in content]
        normalized.append({"role": message["role"], "content": blocks})
    num_blocks = sum(block["type"] == "image" for message in normalized for block in message["content"])
    if num_blocks != len(images):
        raise SampleError(
            f"Sample {sample_id!r} lists {len(images)} image(s) but its text has {num_blocks} '<image>' "
            "placeholder(s); put one '<image>' in the text per image."
        )
    if not any(message["role"] == "assistant" for message in normalized):
        raise SampleError(f"Sample {sample_id!r} has no assistant turn, so it has nothing to train on.")
    return {"id": sample_id, "messages": normalized, "images": images}


class LlavaConversationDataset(Dataset):
    r"""
    A map-style dataset of LLaVA conversations; images are opened in `__getitem__`, never at construction.

    Args:
        data_path (`str` or `os.PathLike`):
            A `.json` list or `.jsonl` file in the LLaVA (`"conversations"`) or messages (`"messages"`) format.
        image_folder (`str` or `os.PathLike`, *optional*):
            Folder that relative image paths are resolved against; defaults to the folder of `data_path`.
        on_bad_sample (`"raise"` or `"skip"`, *optional*, defaults to `"raise"`):
            What a sample whose image is missing or unreadable does: raise an error naming the sample, or warn and
            yield `None`, which `LlavaExtDataCollator` drops from the batch.
        tokens_per_image (`int`, *optional*, defaults to 576):
            Only used by `lengths`, the length estimate for `train_sampling_strategy="group_by_length"`.

    Each item is `{"id": str, "messages": list[dict]}`: transformers chat messages whose `{"type": "image"}` blocks
    hold the opened `PIL.Image` under `"image"`.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        tokens_per_image: int = 576,
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample={on_bad_sample!r} is not supported; use 'raise' or 'skip'.")
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.data_path.parent
        self.on_bad_sample = on_bad_sample
        self.tokens_per_image = tokens_per_image
        self.samples = [normalize_record(record, index) for index, record in enumerate(load_records(data_path))]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Cheap per-sample length estimates (words + `tokens_per_image` per image), for length-grouped sampling."""
        return [
            sum(len(block.get("text", "").split()) for message in sample["messages"] for block in message["content"])
            + self.tokens_per_image * len(sample["images"])
            for sample in self.samples
        ]

    def _open_image(self, sample_id: str, image: str) -> Image.Image:
        path = Path(image) if os.path.isabs(image) else self.image_folder / image
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as error:  # missing file, truncated or not an image
            raise SampleError(
                f"Sample {sample_id!r}: cannot read image {str(path)!r} ({type(error).__name__}: {error}); fix "
                "image_folder or the path in the data file, or pass on_bad_sample='skip' to leave such samples out."
            ) from error

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            images = iter([self._open_image(sample["id"], image) for image in sample["images"]])
        except SampleError as error:
            if self.on_bad_sample == "raise":
                raise
            warnings.warn(f"Skipping a sample: {error}", stacklevel=2)
            return None
        messages = [
            {
                "role": message["role"],
                "content": [
                    {"type": "image", "image": next(images)} if block["type"] == "image" else block
                    for block in message["content"]
                ],
            }
            for message in sample["messages"]
        ]
        return {"id": sample["id"], "messages": messages}


class LlavaExtDataCollator:
    r"""
    Turns dataset items into a right-padded training batch whose labels cover the assistant answers only.

    Each conversation is rendered and tokenized by `processor.apply_chat_template(...,
    return_assistant_tokens_mask=True)`; the chat template's `{% generation %}` blocks decide what is trained on, so
    the same collator works for every template and backbone. Prompts, `<image>` tokens and padding get `-100`.

    Args:
        processor (`ProcessorMixin`):
            A LLaVA processor with a chat template marking assistant text with `{% generation %}`.
        model_max_length (`int`, *optional*):
            Longest sequence kept; longer samples are cut on the right. A cut through the image tokens is never made:
            such a sample raises (or is dropped, see `on_overlong`). Defaults to no limit.
        on_overlong (`"raise"` or `"drop"`, *optional*, defaults to `"raise"`):
            What a sample whose image tokens do not fit in `model_max_length` does: raise a `SampleError` naming it,
            or warn and leave it out of the batch.

    Returns (from `__call__`):
        `dict` with `input_ids`, `attention_mask`, `labels` of shape `(batch, longest)` and, when the batch has
        images, `pixel_values` of shape `(total_images, channels, height, width)` in sample order.
    """

    def __init__(self, processor, model_max_length: int | None = None, on_overlong: Literal["raise", "drop"] = "raise"):
        if on_overlong not in ("raise", "drop"):
            raise ValueError(f"on_overlong={on_overlong!r} is not supported; use 'raise' or 'drop'.")
        if model_max_length is not None and model_max_length <= 0:
            raise ValueError(f"model_max_length={model_max_length} must be a positive number of tokens (or None).")
        self.processor = processor
        self.model_max_length = model_max_length
        self.on_overlong = on_overlong
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = getattr(processor, "image_token_id", None) or tokenizer.convert_tokens_to_ids(image_token)

    def encode(self, sample: dict) -> dict[str, torch.Tensor] | None:
        """One item -> `input_ids`, `labels` (1-D) and `pixel_values` (or None), truncated; None if dropped."""
        encoded = self.processor.apply_chat_template(
            sample["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
        input_ids = encoded["input_ids"][0]  # (seq,)
        assistant_mask = torch.as_tensor(encoded["assistant_masks"][0], dtype=torch.bool)  # (seq,)
        if not assistant_mask.any():
            raise SampleError(
                f"Sample {sample.get('id')!r}: the chat template marks no assistant tokens; use a template whose "
                "assistant text is wrapped in '{% generation %}...{% endgeneration %}' (the bundled ones are)."
            )
        labels = torch.where(assistant_mask & (input_ids != self.image_token_id), input_ids, IGNORE_INDEX)

        limit = self.model_max_length
        if limit is not None and input_ids.shape[0] > limit:
            image_positions = (input_ids == self.image_token_id).nonzero().flatten()
            if image_positions.numel() and int(image_positions[-1]) >= limit:
                message = (
                    f"Sample {sample.get('id')!r} is {input_ids.shape[0]} tokens and its image tokens run to position "
                    f"{int(image_positions[-1]) + 1}, past model_max_length={limit}; truncating would cut the image "
                    "tokens. Raise model_max_length, shorten the sample, or set on_overlong='drop' to leave such "
                    "samples out."
                )
                if self.on_overlong == "raise":
                    raise SampleError(message)
                warnings.warn(f"Dropping a sample: {message}", stacklevel=2)
                return None
            input_ids, labels = input_ids[:limit], labels[:limit]
        pixel_values = encoded.get("pixel_values")
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}

    def __call__(self, samples: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(sample) for sample in samples if sample is not None]
        encoded = [item for item in encoded if item is not None]
        if not encoded:
            raise SampleError(
                f"Every one of the {len(samples)} samples in this batch was skipped or dropped (unreadable images or "
                "too long); fix the data or raise model_max_length."
            )
        longest = max(item["input_ids"].shape[0] for item in encoded)
        batch_size = len(encoded)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)  # (batch, longest)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, item in enumerate(encoded):  # right padding: training never generates, and the loss skips the pad
            length = item["input_ids"].shape[0]
            input_ids[row, :length] = item["input_ids"]
            labels[row, :length] = item["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixel_values = [item["pixel_values"] for item in encoded if item["pixel_values"] is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)  # (total_images, channels, height, width)
        return batch


__all__ = [
    "IGNORE_INDEX",
    "LlavaConversationDataset",
    "LlavaExtDataCollator",
    "SampleError",
    "load_records",
    "normalize_record",
]
