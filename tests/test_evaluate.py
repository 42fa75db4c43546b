"""`llava_ext.evaluate` and `llava-ext eval`: answer normalization, exact / contains scoring, Wilson intervals against
published values, record errors that name the line, batched == unbatched greedy answers, and the CLI end to end.
"""

import json

import pytest
import torch
from conftest import tiny_llava_config
from PIL import Image
from test_data import make_processor

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.cli import main
from llava_ext import demo
from llava_ext.demo import COLOR_QUESTIONS, COLORS, SHAPE_QUESTIONS, SHAPES, make_shapes_dataset
from llava_ext.evaluate import (
    EvalRecord,
    contains_answer,
    eval_records_from_conversations,
    evaluate_checkpoint,
    generate_answers,
    is_exact_match,
    load_eval_records,
    normalize_answer,
    score_predictions,
    wilson_interval,
)

QUESTIONS = ["Color?", "What color is the square in this picture?", "Name it.", "Is the image mostly dark or light?"]


@pytest.mark.parametrize(
    "text, expected",
    [(" Red. ", "red"), ("A  Red\n\tCircle!!", "a red circle"), ("U.S.", "u.s"), ("yes ,", "yes"), ("", ""),
     ("?!", ""), ("STRASSE", "strasse")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_contains_answer():
    assert is_exact_match("Red.", ["blue", "RED"]) and contains_answer("Red.", ["blue", "RED"])
    assert not is_exact_match("It is red.", ["red"]) and contains_answer("It is red.", ["red"])
    assert not contains_answer("covered", ["red"])  # whole words only
    assert contains_answer("a dark red circle", ["red circle"]) and not contains_answer("red, circle", ["red circle"])
    assert not is_exact_match("", ["red"]) and not contains_answer("", ["red"])


@pytest.mark.parametrize(
    # 95% intervals to 4 decimals, found apart from the closed form: the p on a 1e-6 grid that the score test
    # (k/n - p)^2 <= z^2 p (1 - p) / n accepts; 8/10 -> (0.4902, 0.9433) is also the usual textbook example
    "successes, total, expected",
    [(8, 10, (0.4902, 0.9433)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (50, 100, (0.4038, 0.5962)),
     (1, 4, (0.0456, 0.6994)), (2, 4, (0.1500, 0.8500))],
)
def test_wilson_interval_matches_published_values(successes, total, expected):
    lower, upper = wilson_interval(successes, total)
    assert lower == pytest.approx(expected[0], abs=5e-5) and upper == pytest.approx(expected[1], abs=5e-5)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match=r"total=0: an interval needs at least one question"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes=5 is outside 0..total=4"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match=r"confidence=95 must be between 0 and 1"):
        wilson_interval(1, 4, confidence=95)


def test_score_predictions_counts_and_intervals(tmp_path):
    records = [EvalRecord(line, tmp_path / "x.png", "Color?", answers) for line, answers in
               enumerate([("red",), ("blue", "navy"), ("green",), ("yellow",)], start=1)]
    result = score_predictions(records, ["Red!", "it is navy blue", "a green one", "purple"])
    assert [p.exact_match for p in result.predictions] == [True, False, False, False]
    assert [p.contains_answer for p in result.predictions] == [True, True, True, False]
    assert (result.exact_match.correct, result.exact_match.total, result.exact_match.accuracy) == (1, 4, 0.25)
    assert (result.contains_answer.correct, result.contains_answer.accuracy) == (3, 0.75)
    assert result.exact_match.interval == pytest.approx((0.0456, 0.6994), abs=5e-5)
    assert result.contains_answer.interval == pytest.approx((0.3006, 0.9544), abs=5e-5)
    assert result.num_questions == 4 and result.predictions[1].answers == ["blue", "navy"]
    with pytest.raises(ValueError, match="Got 3 predictions for 4 records"):
        score_predictions(records, ["a", "b", "c"])


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_records_resolve_relative_and_absolute_images(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    absolute = tmp_path / "b.png"
    Image.new("RGB", (8, 8)).save(absolute)
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": 7, "image": "images/a.png", "question": " Color? ", "answers": ["red"]},
        "",
        {"image": str(absolute), "question": "Shape?", "answers": ["circle", "a circle"]},
    ])
    first, second = load_eval_records(data)
    assert (first.line, first.id, first.image, first.question, first.answers) == (
        1, "7", tmp_path / "images" / "a.png", "Color?", ("red",))
    assert (second.line, second.id, second.image, second.answers) == (3, None, absolute, ("circle", "a circle"))


GOOD = {"image": "a.png", "question": "Color?", "answers": ["red"]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"image": "a.png",', r"line 2 is not valid JSON"),
        (["a.png"], r"line 2 is \['a.png'\], not a JSON object"),
        ({"image": "a.png", "question": "Color?"}, r"line 2 has no \['answers'\]"),
        ({**GOOD, "answers": "red"}, r"line 2: 'answers' is the string 'red'; give a list, e.g. \['red'\]"),
        ({**GOOD, "answers": []}, r"line 2: 'answers' is \[\]; give a non-empty list"),
        ({**GOOD, "answers": ["red", "..."]}, r"line 2: 'answers' is .*more than punctuation"),
        ({**GOOD, "question": ""}, r"line 2: 'question' is ''; give a non-empty string"),
        ({**GOOD, "question": "<image>\nColor?"}, r"line 2: the question contains '<image>'; remove it"),
        ({**GOOD, "image": 3}, r"line 2: 'image' is 3; give the image's path"),
    ],
)
def test_bad_records_name_their_line(tmp_path, bad, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "eval.jsonl", [GOOD, bad])
    with pytest.raises(ValueError, match=message):
        load_eval_records(data)


def test_missing_image_and_empty_file(tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{**GOOD, "image": "nowhere/a.png"}])
    with pytest.raises(FileNotFoundError, match=r"line 1: image 'nowhere/a.png' \(looked for .*nowhere/a.png'\)"):
        load_eval_records(data)
    with pytest.raises(ValueError, match="holds no questions"):
        load_eval_records(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="does not exist; give a .jsonl file"):
        load_eval_records(tmp_path / "missing.jsonl")


def test_demo_heldout_set_as_eval_records(tmp_path):
    heldout = make_shapes_dataset(tmp_path / "data", num_images=5, seed=1, split="heldout")
    written = eval_records_from_conversations(heldout, tmp_path / "eval" / "heldout.jsonl", limit=4)
    records = load_eval_records(tmp_path / "eval" / "heldout.jsonl")  # image paths now relative to eval/
    assert written == len(records) == 4
    source = json.loads(heldout.read_text())
    for record, sample in zip(records, source):
        assert record.image == (tmp_path / "eval" / ".." / "data" / sample["image"])
        assert record.image.is_file()
        first_question, first_answer = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        assert record.question == first_question.removeprefix("<image>\n")
        assert record.question in SHAPE_QUESTIONS + COLOR_QUESTIONS
        assert record.answers == (first_answer,) and first_answer in SHAPES + tuple(COLORS)


def test_demo_heldout_jsonl_scores_as_the_demo_does(tmp_path):
    """`llava-ext eval` on the demo's held-out set written as JSONL answers and scores as `demo.evaluate`."""
    settings = demo.DemoSettings(vision_hidden_size=32, vision_layers=1)
    heldout = make_shapes_dataset(tmp_path / "data", num_images=6, seed=1, split="heldout")
    records = json.loads(heldout.read_text())
    corpus = [turn["value"] for record in records for turn in record["conversations"]] + ["USER: ASSISTANT:"]
    tokenizer = demo.train_tokenizer(corpus, vocab_size=300)
    demo.build_tiny_llava(tokenizer, settings).save_pretrained(tmp_path / "model")
    demo.build_processor(tokenizer, settings).save_pretrained(tmp_path / "model")
    accuracy, expected = demo.evaluate(tmp_path / "model", heldout, num_questions=6)

    eval_records_from_conversations(heldout, tmp_path / "data" / "heldout.jsonl")
    result = evaluate_checkpoint(tmp_path / "model", tmp_path / "data" / "heldout.jsonl", batch_size=4,
                                 max_new_tokens=6, device="cpu", show_progress=False)
    assert [(p.question, p.answers[0], p.prediction) for p in result.predictions] == expected
    assert result.exact_match.accuracy == accuracy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny random LLaVA + processor and four questions about different images."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict()))
    model.save_pretrained(root / "checkpoint")
    make_processor().save_pretrained(root / "checkpoint")
    generator = torch.Generator().manual_seed(0)
    for index in range(len(QUESTIONS)):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{index}.png")
    return root


def eval_records(root) -> list[EvalRecord]:
    return [EvalRecord(i + 1, root / f"{i}.png", question, ("x",)) for i, question in enumerate(QUESTIONS)]


def answer_one_by_one(model, processor, records, max_new_tokens) -> list[str]:
    """Reference answers: each question alone (no padding), greedy."""
    answers = []
    for record in records:
        conversation = [{"role": "user", "content": [{"type": "image", "image": Image.open(record.image)},
                                                     {"type": "text", "text": record.question}]}]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def test_batched_answers_equal_unbatched(checkpoint):
    model = LlavaExtForConditionalGeneration.from_pretrained(checkpoint / "checkpoint").eval()
    processor = make_processor()
    records = eval_records(checkpoint)
    expected = answer_one_by_one(model, processor, records, max_new_tokens=6)
    assert len(set(expected)) > 1  # the questions and images tell the rows apart
    assert generate_answers(model, processor, records, batch_size=1, max_new_tokens=6, show_progress=False) == expected
    # batches of 3 and 1: the short questions are left-padded next to the long ones
    assert generate_answers(model, processor, records, batch_size=3, max_new_tokens=6, show_progress=False) == expected


def test_cli_end_to_end(checkpoint, tmp_path, capsys):
    model = LlavaExtForConditionalGeneration.from_pretrained(checkpoint / "checkpoint").eval()
    records = eval_records(checkpoint)
    predicted = answer_one_by_one(model, make_processor(), records, max_new_tokens=6)
    assert all(normalize_answer(answer) for answer in predicted)
    # the first two accept the model's answer (in other case, with punctuation), the last two something it cannot say
    answers = [[predicted[0].upper() + "!"], ["nothing", predicted[1] + " ."], ["a far longer answer"], ["x" * 12]]
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": f"q{i}", "image": str(record.image), "question": record.question, "answers": accepted}
        for i, (record, accepted) in enumerate(zip(records, answers))
    ])
    output = tmp_path / "predictions.jsonl"
    assert main(["eval", str(checkpoint / "checkpoint"), "--data", str(data), "--batch-size", "3",
                 "--max-new-tokens", "6", "--output", str(output), "--no-progress", "--device", "cpu"]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == f"4 questions from {data}, answered by {checkpoint / 'checkpoint'}:"
    assert report[1] == "exact match:     2/4 = 50.0% (95% CI 15.0% to 85.0%)"
    assert report[2] == "contains answer: 2/4 = 50.0% (95% CI 15.0% to 85.0%)"
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["prediction"] for line in lines] == predicted
    assert [line["id"] for line in lines] == ["q0", "q1", "q2", "q3"]
    assert [(line["exact_match"], line["contains_answer"]) for line in lines] == [(True, True)] * 2 + [(False, False)] * 2


def test_cli_reports_a_bad_line_before_loading_the_model(tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"image": "a.png", "question": "Color?"}])
    with pytest.raises(SystemExit, match=r"llava-ext eval: error: .*eval.jsonl' line 1 has no \['answers'\]"):
        main(["eval", str(tmp_path / "no-such-checkpoint"), "--data", str(data)])
    with pytest.raises(SystemExit, match=r"batch_size=0 and max_new_tokens=16 must both be at least 1"):
        main(["eval", str(tmp_path / "no-such-checkpoint"), "--data", str(data), "--batch-size", "0"])
