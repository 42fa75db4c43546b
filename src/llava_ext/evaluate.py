"""Score a checkpoint's answers to image questions: exact match and contains-answer accuracy with Wilson intervals.

The data is JSON Lines, one question a line::

    {"id": "q1", "image": "images/heldout-00000.png", "question": "What shape is shown?", "answers": ["circle"]}

`image` is a path relative to the JSONL file (or absolute), `answers` the acceptable answers and `id` optional. Each
question is asked with the processor's chat template (one image, then the question), answered greedily in left-padded
batches, and compared with the answers after `normalize_answer` (case, whitespace, trailing punctuation):

    exact match       the normalized answer equals one normalized acceptable answer
    contains answer   one normalized acceptable answer appears in it as whole words ("it is red" contains "red")

Scoring (`score_predictions`, `wilson_interval`) is separate from generation (`generate_answers`), so it is checked
without a model; `evaluate_checkpoint` puts load, generate and score together (`llava-ext eval` is its CLI).
"""

import json
import math
import os
import re
import reprlib
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import torch

from .chat import load_model_and_processor
from .compat import load_image, tqdm
from .data import IMAGE_PLACEHOLDER, load_records, normalize_record


@dataclass(frozen=True)
class EvalRecord:
    """One question of an evaluation file: its line (1-based), resolved image path, question and accepted answers."""

    line: int
    image: Path
    question: str
    answers: tuple[str, ...]
    id: str | None = None


@dataclass(frozen=True)
class Prediction:
    """A model's answer to one `EvalRecord` and how it scored."""

    line: int
    id: str | None
    image: str
    question: str
    answers: list[str]
    prediction: str
    exact_match: bool
    contains_answer: bool


@dataclass(frozen=True)
class Score:
    """`correct` of `total` questions, the accuracy and its Wilson score interval at `confidence`."""

    correct: int
    total: int
    accuracy: float
    interval: tuple[float, float]
    confidence: float

    @classmethod
    def from_counts(cls, correct: int, total: int, confidence: float = 0.95) -> "Score":
        return cls(correct, total, correct / total, wilson_interval(correct, total, confidence), confidence)


@dataclass
class EvalResult:
    """What `evaluate_checkpoint` and `score_predictions` return: both scores and every prediction in file order."""

    exact_match: Score
    contains_answer: Score
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def num_questions(self) -> int:
        return self.exact_match.total


# ------------------------------------------------------------------------------------------------------------ scoring
def normalize_answer(text: str) -> str:
    """Case-folded, whitespace runs made one space, trailing punctuation and spaces removed: ' Red. ' -> 'red'."""
    return " ".join(text.casefold().split()).rstrip(string.punctuation + " ")


def is_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalized `prediction` equals one normalized answer."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether one normalized answer occurs in the normalized `prediction` as whole words ('red' in 'it is red', not in
    'covered')."""
    predicted = normalize_answer(prediction)
    return any(
        re.search(rf"(?<!\w){re.escape(normalize_answer(answer))}(?!\w)", predicted) is not None for answer in answers
    )


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion `successes / total`.

    Unlike the normal approximation `p +- z * sqrt(p (1 - p) / n)`, it stays inside [0, 1] and is not empty at 0 or
    `total` successes: 8 of 10 at 95% gives (0.490, 0.943), 0 of 10 gives (0, 0.278).

    Args:
        successes (`int`): questions answered correctly, `0 <= successes <= total`.
        total (`int`): questions asked, at least 1.
        confidence (`float`, *optional*, defaults to 0.95): the interval's coverage, in (0, 1).

    Returns:
        `(lower, upper)`, both in [0, 1].
    """
    if total < 1:
        raise ValueError(f"total={total}: an interval needs at least one question.")
    if not 0 <= successes <= total:
        raise ValueError(f"successes={successes} is outside 0..total={total}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be between 0 and 1 (exclusive), e.g. 0.95.")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)  # 1.95996... at 95%
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


def score_predictions(
    records: Sequence[EvalRecord], predictions: Sequence[str], confidence: float = 0.95
) -> EvalResult:
    """Score one predicted answer per record.

    Args:
        records (`Sequence[EvalRecord]`): the questions, e.g. from `load_eval_records`.
        predictions (`Sequence[str]`): the model's answers, in the same order.
        confidence (`float`, *optional*, defaults to 0.95): coverage of the reported intervals.

    Returns:
        `EvalResult` with exact-match and contains-answer `Score`s and a `Prediction` per record.
    """
    if len(records) != len(predictions):
        raise ValueError(f"Got {len(predictions)} predictions for {len(records)} records; give one per record.")
    if not records:
        raise ValueError("There are no records to score.")
    scored = [
        Prediction(
            line=record.line, id=record.id, image=str(record.image), question=record.question,
            answers=list(record.answers), prediction=prediction,
            exact_match=is_exact_match(prediction, record.answers),
            contains_answer=contains_answer(prediction, record.answers),
        )
        for record, prediction in zip(records, predictions)
    ]
    total = len(scored)
    return EvalResult(
        exact_match=Score.from_counts(sum(p.exact_match for p in scored), total, confidence),
        contains_answer=Score.from_counts(sum(p.contains_answer for p in scored), total, confidence),
        predictions=scored,
    )


# ---------------------------------------------------------------------------------------------------------------- data
def _check_record(value, number: int, where: str, folder: Path) -> EvalRecord:
    """One parsed line -> `EvalRecord`; a `ValueError` / `FileNotFoundError` naming the line otherwise."""
    example = '{"image": "cat.png", "question": "What animal is this?", "answers": ["cat", "a cat"]}'
    if not isinstance(value, dict):
        raise ValueError(f"{where} line {number} is {reprlib.repr(value)}, not a JSON object; write e.g. {example}.")
    missing = [key for key in ("image", "question", "answers") if key not in value]
    if missing:
        raise ValueError(f"{where} line {number} has no {missing} (keys: {sorted(value)}); write e.g. {example}.")
    image, question, answers = value["image"], value["question"], value["answers"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where} line {number}: 'image' is {reprlib.repr(image)}; give the image's path as a string.")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where} line {number}: 'question' is {reprlib.repr(question)}; give a non-empty string.")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(
            f"{where} line {number}: the question contains {IMAGE_PLACEHOLDER!r}; remove it, the chat template places "
            "the image."
        )
    if isinstance(answers, str):
        raise ValueError(
            f"{where} line {number}: 'answers' is the string {answers!r}; give a list, e.g. [{answers!r}]."
        )
    if (
        not isinstance(answers, list) or not answers
        or not all(isinstance(answer, str) and normalize_answer(answer) for answer in answers)
    ):
        raise ValueError(
            f"{where} line {number}: 'answers' is {reprlib.repr(answers)}; give a non-empty list of acceptable "
            "answers, each a string with more than punctuation and spaces."
        )
    path = Path(image).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise FileNotFoundError(
            f"{where} line {number}: image {image!r} (looked for {str(path)!r}) does not exist; paths are relative to "
            "the JSONL file's folder, or absolute."
        )
    record_id = value.get("id")
    return EvalRecord(number, path, question.strip(), tuple(answers), None if record_id is None else str(record_id))


def load_eval_records(data_path: str | os.PathLike) -> list[EvalRecord]:
    """Read and check an evaluation JSONL file (see the module docstring); every error names the file and line.

    Images are checked to exist here, before any model loads, and opened only when their batch is generated.
    """
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist; give a .jsonl file of questions.")
    where = repr(str(path))
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where} line {number} is not valid JSON ({error.msg}, column {error.colno}); each line holds one "
                    'question, e.g. {"image": "cat.png", "question": "What animal is this?", "answers": ["cat"]}.'
                ) from error
            records.append(_check_record(value, number, where, path.parent))
    if not records:
        raise ValueError(f"{where} holds no questions; write one JSON object a line.")
    return records


def eval_records_from_conversations(
    data_path: str | os.PathLike, output_path: str | os.PathLike, limit: int | None = None
) -> int:
    """Write a training-format dataset's first question about each image as an evaluation JSONL file.

    Each record (LLaVA `conversations` or `messages`, as `LlavaConversationDataset` reads) whose first user turn holds
    exactly one image becomes `{"id", "image", "question", "answers": [first assistant answer]}`; others are left out.
    Image paths are rewritten relative to `output_path`'s folder.

    Args:
        data_path (`str`): a `.json` list or `.jsonl` file of conversations; images relative to its folder.
        output_path (`str`): the evaluation `.jsonl` file to write.
        limit (`int`, *optional*): write at most this many questions.

    Returns:
        The number of questions written.
    """
    source, output = Path(data_path), Path(output_path)
    lines = []
    for index, raw in enumerate(load_records(source)):
        if limit is not None and len(lines) >= limit:
            break
        record = normalize_record(raw, index)
        messages = record["messages"]
        first_user = next(i for i, message in enumerate(messages) if message["role"] == "user")
        blocks = messages[first_user]["content"]
        reply = next((m for m in messages[first_user + 1 :] if m["role"] == "assistant"), None)
        answer = "".join(block["text"] for block in reply["content"] if block["type"] == "text") if reply else ""
        if sum(block["type"] == "image" for block in blocks) != 1 or not normalize_answer(answer):
            continue
        # only user turns hold images, in order: the first image is the first user turn's
        image = Path(os.path.relpath((source.parent / record["images"][0]).absolute(), output.parent.absolute()))
        question = " ".join(block["text"] for block in blocks if block["type"] == "text")
        lines.append(json.dumps({"id": record["id"], "image": image.as_posix(), "question": question,
                                 "answers": [answer]}))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def write_predictions(result: EvalResult, output_path: str | os.PathLike) -> None:
    """One JSON line per question: line, id, image, question, answers, prediction, exact_match, contains_answer."""
    with Path(output_path).open("w", encoding="utf-8") as handle:
        for prediction in result.predictions:
            handle.write(json.dumps(asdict(prediction)) + "\n")


# ---------------------------------------------------------------------------------------------------------- generation
def _open_image(record: EvalRecord):
    try:
        return load_image(str(record.image))
    except Exception as error:  # PIL raises several types for unreadable files
        raise ValueError(f"Line {record.line}: image {str(record.image)!r} could not be read ({error}).") from error


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    records: Sequence[EvalRecord],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    show_progress: bool = True,
) -> list[str]:
    """Answer each record's question about its image greedily, `batch_size` questions at a time.

    Each prompt is the processor's chat template over one user turn (the image, then the question) with the generation
    prompt; batches are left-padded so every row continues from its last real token:

        <pad> <pad> <s> USER: <image>x576 \\n What shape is shown? ASSISTANT:  ->  generate  ->  " circle</s>"
        <s> USER: <image>x576 \\n Which color does the shape have? ASSISTANT:    ->  generate  ->  " red</s>"

    Args:
        model (`PreTrainedModel`): a LLaVA model in eval mode.
        processor (`ProcessorMixin`): its processor, with a chat template.
        records (`Sequence[EvalRecord]`): the questions.
        batch_size (`int`, *optional*, defaults to 8): questions per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 16): the longest answer.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over questions (on stderr).

    Returns:
        The decoded answers (special tokens dropped, surrounding whitespace stripped), in record order.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be at least 1.")
    answers = []
    with tqdm(total=len(records), unit="question", desc="eval", disable=not show_progress) as progress:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            conversations = [
                [{"role": "user", "content": [{"type": "image", "image": _open_image(record)},
                                              {"type": "text", "text": record.question}]}]
                for record in batch
            ]
            inputs = processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True, "padding_side": "left"},
            ).to(model.device, dtype=model.dtype)  # dtype applies to pixel_values only
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # (batch, <= max_new_tokens)
            answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            progress.update(len(batch))
    return answers


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_path: str | os.PathLike,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    *,
    device: str | None = None,
    dtype: str = "auto",
    quantize: str | None = None,
    trust_remote_code: bool = False,
    confidence: float = 0.95,
    show_progress: bool = True,
) -> EvalResult:
    """Load a checkpoint, answer every question of an evaluation JSONL file and score the answers.

    Args:
        checkpoint (`str`): a local checkpoint directory or Hub id (model + processor).
        data_path (`str`): the evaluation `.jsonl` file (see the module docstring); checked before the model loads.
        batch_size (`int`, *optional*, defaults to 8): questions per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 16): the longest answer.
        device (`str`, *optional*): "cpu" or "cuda"; cuda when available.
        dtype (`str`, *optional*, defaults to `"auto"`): "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        quantize (`str`, *optional*): `None`, `"int8"` or `"int4"` (torchao int8 / CPU int4 weight-only language
            model, see `llava_ext.chat.load_model_and_processor`), to score a model as it will be served.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow code shipped with non-llava_ext checkpoints.
        confidence (`float`, *optional*, defaults to 0.95): coverage of the Wilson intervals.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over questions.

    Returns:
        `EvalResult` with exact-match and contains-answer accuracy, their intervals and every prediction.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be at least 1.")
    records = load_eval_records(data_path)
    model, processor = load_model_and_processor(str(checkpoint), device, dtype, trust_remote_code, quantize=quantize)
    predictions = generate_answers(model, processor, records, batch_size, max_new_tokens, show_progress)
    return score_predictions(records, predictions, confidence)


__all__ = [
    "EvalRecord",
    "EvalResult",
    "Prediction",
    "Score",
    "contains_answer",
    "eval_records_from_conversations",
    "evaluate_checkpoint",
    "generate_answers",
    "is_exact_match",
    "load_eval_records",
    "normalize_answer",
    "score_predictions",
    "wilson_interval",
    "write_predictions",
]
