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
import re
import reprlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # the label value transformers' losses skip
IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")  # the roles the bundled chat templates render


# What a processor returns for a sample's images, concatenated over the batch's samples by `batch_image_inputs`:
# LLaVA-1.5's pixel_values; the anyres families' (NeXT, OneVision) crops, original sizes and images per sample.
IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


class SampleError(ValueError):
    """A training sample that cannot be used as given (malformed record, missing or unreadable image, placeholders cut
    by truncation...); the message names the sample."""


@dataclass(frozen=True)
class SkippedSample:
    """A sample that `on_bad_sample="skip"` left out: its record's position in the data file (0-based), id and why."""

    index: int
    id: str
    reason: str


def load_records(data_path: str | os.PathLike) -> list:
    """Read a JSON list or a JSON Lines file of samples; a syntax error names the file and line."""
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist; give a .json (list) or .jsonl file of samples.")
    with path.open(encoding="utf-8") as handle:
        text = handle.read()
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{str(path)!r} line {number} is not valid JSON ({error.msg}, column {error.colno}); a .jsonl file "
                    "holds one sample object per line, a .json file one list of them."
                ) from error
        return records
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno}); give a JSON "
            "list of samples or a .jsonl file with one sample per line."
        ) from error


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


def _record_id(record: Any, index: int) -> str:
    """A record's `id`, or its position in the data file when it has none."""
    return str(record.get("id", index)) if isinstance(record, dict) else str(index)


def _record_name(index: int, sample_id: str) -> str:
    """'Record 3 (id 'abc')': how errors name a sample (its position in the data file, 0-based, and its id)."""
    return f"Record {index} (id {sample_id!r})"


def _image_paths(value: Any, key: str, name: str) -> list[str]:
    """A record's `image` / `images` value (absent, one path or a list of paths) as a list of paths."""
    if value is None or value == "":
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
        raise SampleError(
            f"{name}: {key!r} is {reprlib.repr(value)}; give an image path or a list of image paths (relative to "
            "image_folder)."
        )
    return list(paths)


def _objects(value: Any, key: str, items: str, name: str) -> list[dict]:
    """A record's `conversations` / `messages` value, checked to be a list of JSON objects."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise SampleError(f"{name}: {key!r} is {reprlib.repr(value)}; give a list of {items}.")
    return value


def _content_blocks(content: Any, name: str) -> list[dict]:
    """A message's content (a string with '<image>' placeholders, or a list of blocks) as checked blocks."""
    if isinstance(content, str):
        return _split_placeholders(content)
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise SampleError(
            f"{name}: a message's content is {reprlib.repr(content)}; give a string (with '<image>' placeholders) or a "
            "list of {'type': 'text', 'text': ...} / {'type': 'image'} blocks."
        )
    for block in content:
        if block.get("type") not in ("text", "image") or (
            block["type"] == "text" and not isinstance(block.get("text"), str)
        ):
            raise SampleError(
                f"{name}: content block {reprlib.repr(block)} is neither {{'type': 'text', 'text': str}} nor "
                "{'type': 'image'}."
            )
    return [dict(block) for block in content]


def normalize_record(record: dict, index: int) -> dict:
    """One sample in either format -> `{"id", "index", "messages" (content as blocks), "images" (paths)}`.

    Args:
        record (`dict`): one sample as read from the data file.
        index (`int`): its position in the file (0-based); names it in errors and is its id when it has none.

    Raises:
        `SampleError` starting with the record's name ("Record 3 (id 'abc'): ...") when the record is malformed: not an
        object, in neither format, a field of the wrong type, a role the chat templates do not know, an image in a
        non-user turn, images that do not match the `<image>` placeholders, or no assistant turn.
    """
    name = _record_name(index, _record_id(record, index))
    if not isinstance(record, dict):
        raise SampleError(
            f"{name} is {reprlib.repr(record)}, not a JSON object; each sample is an object with 'conversations' "
            "(LLaVA format) or 'messages'."
        )
    if "conversations" in record:
        images = _image_paths(record.get("image"), "image", name)
        turns = _objects(record["conversations"], "conversations", "{'from': 'human'|'gpt', 'value': str} turns", name)
        messages = []
        for turn in turns:
            speaker, value = turn.get("from"), turn.get("value")
            if not isinstance(speaker, str) or speaker not in LLAVA_ROLES:
                raise SampleError(
                    f"{name}: a turn has from={reprlib.repr(speaker)}; the LLaVA format uses 'human', 'gpt' (or "
                    "'system')."
                )
            if not isinstance(value, str):
                raise SampleError(f"{name}: a {speaker!r} turn has value={reprlib.repr(value)}; give its text, a str.")
            messages.append({"role": LLAVA_ROLES[speaker], "content": value})
    elif "messages" in record:
        images = _image_paths(record.get("images"), "images", name)
        messages = _objects(record["messages"], "messages", "{'role': ..., 'content': ...} messages", name)
        for message in messages:
            if message.get("role") not in CHAT_ROLES:
                raise SampleError(
                    f"{name}: a message has role={reprlib.repr(message.get('role'))}; use one of {list(CHAT_ROLES)}."
                )
    else:
        raise SampleError(
            f"{name} has keys {sorted(record)}; expected 'conversations' (LLaVA format) or 'messages' (+ optional "
            "'images')."
        )

    normalized = [
        {"role": message["role"], "content": _content_blocks(message.get("content"), name)} for message in messages
    ]
    num_blocks = 0
    for message in normalized:
        in_message = sum(block["type"] == "image" for block in message["content"])
        if in_message and message["role"] != "user":  # the chat templates render images in user turns only
            raise SampleError(f"{name}: a {message['role']!r} message holds an image; put images in user messages.")
        num_blocks += in_message
    if num_blocks != len(images):
        raise SampleError(
            f"{name} lists {len(images)} image(s) but its text has {num_blocks} '<image>' placeholder(s); put one "
            "'<image>' in the text per image."
        )
    if not any(message["role"] == "assistant" for message in normalized):
        raise SampleError(f"{name} has no assistant turn, so it has nothing to train on.")
    return {"id": _record_id(record, index), "index": index, "messages": normalized, "images": images}


def skip_summary(skipped: Sequence[SkippedSample], total: int, shown: int = 5) -> str:
    """'skipped 2 of 10 samples: record 3 (id 'a'): <reason>; record 7 (id 'b'): <reason>' (the first `shown`)."""
    listed = "; ".join(
        f"record {sample.index} (id {sample.id!r}): {sample.reason.rstrip('.')}" for sample in skipped[:shown]
    )
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"skipped {len(skipped)} of {total} samples: {listed}{more}"


class LlavaConversationDataset(Dataset):
    r"""
    A map-style dataset of LLaVA conversations; records are checked at construction, images opened in `__getitem__`.

    Args:
        data_path (`str` or `os.PathLike`):
            A `.json` list or `.jsonl` file in the LLaVA (`"conversations"`) or messages (`"messages"`) format.
        image_folder (`str` or `os.PathLike`, *optional*):
            Folder that image paths are resolved against; defaults to the folder of `data_path`.
        on_bad_sample (`"raise"` or `"skip"`, *optional*, defaults to `"raise"`):
            What a bad sample does: a malformed record (wrong keys or types, unknown role, images not matching the
            `<image>` placeholders, no assistant turn; found at construction) or one whose image is missing or
            unreadable (found in `__getitem__`). `"raise"` stops with a `SampleError` naming the record (its position
            in the data file and its id). `"skip"` warns and leaves it out: malformed records are dropped at
            construction, an unreadable one makes `__getitem__` return `None`, which `LlavaExtDataCollator` drops from
            the batch. Either way it is counted: `skipped_samples()` lists them, and `LlavaExtTrainer` reports
            "skipped N of M samples: ..." at the end of training.
        allow_images_outside_folder (`bool`, *optional*, defaults to `False`):
            By default an image path must stay inside `image_folder` as written: relative without `..`, or absolute
            below the folder; otherwise construction raises a `ValueError` naming the record and the path (whatever
            `on_bad_sample` says), so a data file from elsewhere cannot make training read `/etc/...` or `../..`. Set
            `True` for a trusted data file that uses absolute paths. Symlinks inside `image_folder` are followed
            wherever they point (`images/coco -> /mnt/coco` is a common layout): the data file is the untrusted input,
            the folder and its links are yours.
        tokens_per_image (`int`, *optional*, defaults to 576):
            Only used by `lengths`, the length estimate for `train_sampling_strategy="group_by_length"`.

    Each item is `{"id": str, "messages": list[dict]}`: transformers chat messages whose `{"type": "image"}` blocks
    hold the opened `PIL.Image` under `"image"` (or `None` for a skipped sample).

    Skipped samples and DataLoader workers: with `num_workers > 0`, `__getitem__` runs in the worker processes, whose
    Python state the main process never sees. So an unreadable sample is flagged in `unreadable`, a `(len(self),)`
    uint8 tensor in shared memory that forked and spawned workers alike write into; `skipped_samples()` in the main
    process then sees every worker's skips (and finds their reasons again by reopening the images). Under torchrun or
    accelerate each process has its own dataset and reads its own shard; `LlavaExtTrainer` sums the flags over the
    processes before reporting.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        tokens_per_image: int = 576,
        allow_images_outside_folder: bool = False,
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample={on_bad_sample!r} is not supported; use 'raise' or 'skip'.")
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.data_path.parent
        self.on_bad_sample = on_bad_sample
        self.tokens_per_image = tokens_per_image
        self.allow_images_outside_folder = allow_images_outside_folder

        records = load_records(data_path)
        self.num_records = len(records)
        self.samples, self.invalid_samples = [], []  # invalid_samples: malformed records skipped at construction
        for index, record in enumerate(records):
            try:
                self.samples.append(normalize_record(record, index))
            except SampleError as error:
                if on_bad_sample == "raise":
                    raise SampleError(
                        f"{error} Fix the record in {str(self.data_path)!r}, or set on_bad_sample='skip' to leave bad "
                        "samples out."
                    ) from None
                sample_id = _record_id(record, index)
                reason = str(error).removeprefix(_record_name(index, sample_id)).lstrip(": ")
                self.invalid_samples.append(SkippedSample(index, sample_id, reason))
        if self.invalid_samples:
            warnings.warn(
                f"Skipping malformed records of {str(self.data_path)!r}: "
                f"{skip_summary(self.invalid_samples, self.num_records)}",
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(
                f"{str(self.data_path)!r} has no usable sample ({self.num_records} records"
                + (f", {skip_summary(self.invalid_samples, self.num_records)}" if self.invalid_samples else "")
                + "); give a file of samples in the LLaVA or messages format."
            )
        if not allow_images_outside_folder:
            self._check_images_inside_folder()
        # One flag per item, in shared memory so that DataLoader workers' skips reach the main process (see above).
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def _check_images_inside_folder(self) -> None:
        """Raise naming the first record whose image path, as written, leaves `image_folder` (and how many do)."""
        roots = {os.path.abspath(self.image_folder), os.path.realpath(self.image_folder)}

        def outside(image: str) -> bool:
            if ".." in re.split(r"[\\/]", image):  # even 'a/../b': through a symlinked 'a' it would leave the folder
                return True
            if not os.path.isabs(image):
                return False
            path = os.path.normpath(image)
            return not any(os.path.commonpath([root, path]) == root for root in roots)

        escaping = [(sample, image) for sample in self.samples for image in sample["images"] if outside(image)]
        if escaping:
            sample, image = escaping[0]
            others = f" (and {len(escaping) - 1} more image paths do)" if len(escaping) > 1 else ""
            raise ValueError(
                f"{_record_name(sample['index'], sample['id'])} of {str(self.data_path)!r} has image {image!r}, which "
                f"is outside image_folder={str(self.image_folder)!r}{others}. Image paths must be relative to "
                "image_folder without '..', or absolute inside it: fix the paths or image_folder, or, if you trust "
                "the data file, set allow_images_outside_folder=True (--allow_images_outside_folder true)."
            )

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

    def _open_image(self, name: str, image: str) -> Image.Image:
        path = self.image_folder / image  # an absolute `image` replaces the folder
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # missing, truncated, not an image, huge
            raise SampleError(f"{name}: cannot read image {str(path)!r} ({type(error).__name__}: {error}).") from error

    def _load(self, index: int) -> dict[str, Any]:
        """Item `index` with its images opened; raises `SampleError` for a missing or unreadable image."""
        sample = self.samples[index]
        name = _record_name(sample["index"], sample["id"])
        images = iter([self._open_image(name, image) for image in sample["images"]])
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

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self._load(index)
        except SampleError as error:
            if self.on_bad_sample == "raise":
                raise SampleError(
                    f"{error} Fix image_folder or the path in the data file, or set on_bad_sample='skip' to leave bad "
                    "samples out."
                ) from error.__cause__
            self.unreadable[index] = 1  # shared memory: seen by the main process even when a worker process skips
            warnings.warn(f"Skipping a sample: {error}", stacklevel=2)
            return None

    def skipped_samples(self, unreadable: torch.Tensor | None = None) -> list[SkippedSample]:
        """Every sample left out so far, in data-file order: malformed records and those whose images failed to open.

        Args:
            unreadable (`torch.Tensor` of shape `(len(self),)`, *optional*):
                Flags to use instead of `self.unreadable`, e.g. summed over the processes of a distributed run.

        The reason for an unreadable sample is found again here by reopening its images (workers cannot send it).
        """
        flags = self.unreadable if unreadable is None else unreadable
        skipped = list(self.invalid_samples)
        for position in flags.nonzero().flatten().tolist():
            sample = self.samples[position]
            name = _record_name(sample["index"], sample["id"])
            try:
                self._load(position)
                reason = "its image could not be read during training (it can now)"
            except SampleError as error:
                reason = str(error).removeprefix(f"{name}: ")
            skipped.append(SkippedSample(sample["index"], sample["id"], reason))
        return sorted(skipped, key=lambda sample: sample.index)


def batch_image_inputs(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The image inputs (`IMAGE_INPUT_KEYS`) of one-sample encodings, as one batch's, in sample order.

    Anyres `pixel_values` hold each image's base view and tiles, padded to the sample's most crops; a batch pads them
    to its most, with zero crops the model never reads (it counts each image's crops from `image_sizes`):

        sample 0: (1 image, 3 crops, C, H, W)   sample 1: (2 images, 5 crops, C, H, W)  ->  (3 images, 5 crops, C, H, W)
    """
    batch = {}
    for key in IMAGE_INPUT_KEYS:
        values = [torch.as_tensor(sample[key]) for sample in samples if sample.get(key) is not None]
        if not values:
            continue
        if key == "pixel_values" and values[0].dim() == 5:
            most = max(value.shape[1] for value in values)
            # (num_images, most, C, H, W) each: zero crops after an image's own
            values = [torch.nn.functional.pad(value, (0, 0, 0, 0, 0, 0, 0, most - value.shape[1])) for value in values]
        batch[key] = torch.cat(values, dim=0)  # (total_images, ...); batch_num_images: (batch,)
    return batch


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
            such a sample raises (or is dropped, see `on_overlong`). A cut that leaves a sample no answer token to
            train on warns, naming it. Defaults to no limit.
        on_overlong (`"raise"` or `"drop"`, *optional*, defaults to `"raise"`):
            What a sample whose image tokens do not fit in `model_max_length` does: raise a `SampleError` naming it,
            or warn and leave it out of the batch.

    Returns (from `__call__`):
        `dict` with `input_ids`, `attention_mask`, `labels` of shape `(batch, longest)` and, when the batch has
        images, `pixel_values` of shape `(total_images, channels, height, width)` in sample order; for the anyres
        processors (NeXT, OneVision) `(total_images, max_crops, channels, height, width)` with `image_sizes`
        `(total_images, 2)` (and OneVision's `batch_num_images` `(batch,)`), see `batch_image_inputs`.

    Raises:
        `SampleError` naming the sample for an item that is not `{"id", "messages"}`, a `<image>` written in a
        message's text (an image is a `{"type": "image"}` block), images the chat template does not place, or a cut
        through its image tokens (`on_overlong="raise"`); every item's structure is checked before any is encoded.
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
        if self.pad_token_id is None:
            raise ValueError(
                "The tokenizer has neither a pad_token nor an eos_token to pad batches with; set one first (e.g. "
                "tokenizer.pad_token = tokenizer.unk_token)."
            )
        self.image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = getattr(processor, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )

    def _check_sample(self, sample: Any, position: int | None = None) -> None:
        """Raise a `SampleError` naming the item for what `apply_chat_template` would trip over deep inside."""
        where = f"Batch item {position}" if position is not None else "A batch item"
        if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
            raise SampleError(
                f"{where} is a {type(sample).__name__}"
                + (f" with keys {sorted(map(str, sample))}" if isinstance(sample, dict) else "")
                + "; the collator takes {'id': ..., 'messages': [...]} items as LlavaConversationDataset yields them "
                "(or None for a skipped sample)."
            )
        name = f"Sample {sample.get('id')!r}"
        for number, message in enumerate(sample["messages"]):
            content = message.get("content") if isinstance(message, dict) else None
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or not all(isinstance(block, dict) for block in blocks):
                raise SampleError(
                    f"{name}: message {number} is a {type(message).__name__} with content of type "
                    f"{type(content).__name__}; a message is {{'role': ..., 'content': str or a list of "
                    "{'type': 'text' | 'image', ...} blocks}."
                )
            if any(self.image_token in str(block.get("text", "")) for block in blocks if block.get("type") == "text"):
                raise SampleError(
                    f"{name}: message {number}'s text contains '{self.image_token}', which would be read as an image "
                    f"marker without an image; an image is a {{'type': 'image', 'image': ...}} block "
                    f"(LlavaConversationDataset turns '{self.image_token}' in data files into those), so take it out "
                    "of the text."
                )

    def encode(self, sample: dict) -> dict[str, torch.Tensor] | None:
        """One item -> `input_ids`, `labels` (1-D) and its image inputs (`IMAGE_INPUT_KEYS`), truncated; None if
        dropped."""
        self._check_sample(sample)
        name = f"Sample {sample.get('id')!r}"
        try:
            encoded = self.processor.apply_chat_template(
                sample["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                return_tensors="pt",
            )
        except ValueError as error:  # the processor's own checks (images vs markers, an image...): name the sample
            raise SampleError(f"{name}: {error}") from error
        input_ids = encoded["input_ids"][0]  # (seq,)
        assistant_mask = torch.as_tensor(encoded["assistant_masks"][0], dtype=torch.bool)  # (seq,)
        if not assistant_mask.any():
            raise SampleError(
                f"{name}: the chat template marks no assistant tokens; use a template whose assistant text is wrapped "
                "in '{% generation %}...{% endgeneration %}' (the bundled ones are)."
            )
        labels = torch.where(assistant_mask & (input_ids != self.image_token_id), input_ids, IGNORE_INDEX)

        limit = self.model_max_length
        if limit is not None and input_ids.shape[0] > limit:
            image_positions = (input_ids == self.image_token_id).nonzero().flatten()
            if image_positions.numel() and int(image_positions[-1]) >= limit:
                message = (
                    f"{name} is {input_ids.shape[0]} tokens and its image tokens run to position "
                    f"{int(image_positions[-1]) + 1}, past model_max_length={limit}; truncating would cut the image "
                    "tokens. Raise model_max_length, shorten the sample, or set on_overlong='drop' to leave such "
                    "samples out."
                )
                if self.on_overlong == "raise":
                    raise SampleError(message)
                warnings.warn(f"Dropping a sample: {message}", stacklevel=2)
                return None
            trained_positions = (labels != IGNORE_INDEX).nonzero().flatten()
            if not trained_positions.numel() or int(trained_positions[0]) >= limit:  # all -100 once cut
                first_answer = int(trained_positions[0]) + 1 if trained_positions.numel() else input_ids.shape[0]
                warnings.warn(
                    f"{name} is {input_ids.shape[0]} tokens and its answers start at position {first_answer}, past "
                    f"model_max_length={limit}: cut there, it has no answer token to train on. Raise "
                    "model_max_length or shorten the sample.",
                    stacklevel=2,
                )
            input_ids, labels = input_ids[:limit], labels[:limit]
        images = {key: encoded[key] for key in IMAGE_INPUT_KEYS if encoded.get(key) is not None}
        return {"input_ids": input_ids, "labels": labels, **images}

    def __call__(self, samples: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        for position, sample in enumerate(samples):  # every item, before any image is processed
            if sample is not None:
                self._check_sample(sample, position)
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
        batch.update(batch_image_inputs(encoded))
        return batch


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_INPUT_KEYS",
    "LlavaConversationDataset",
    "LlavaExtDataCollator",
    "SampleError",
    "SkippedSample",
    "batch_image_inputs",
    "load_records",
    "normalize_record",
    "skip_summary",
]
