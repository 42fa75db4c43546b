"""`llava-ext demo --quick`: the offline newcomer path end to end, through the real CLI."""

import random
import re
import subprocess
import sys

import pytest
from conftest import HANG_GUARD_S, needs_image_assistant_masks
from transformers.utils import logging as transformers_logging

from llava_ext.cli import main
from llava_ext.demo import COLORS, SHAPES, DemoSettings, draw_shape

# A demo that trains 3 steps a stage: for what the command prints, not what the model learns
TINY = {"train_images": 48, "eval_questions": 4, "stage1_epochs": 1.0, "stage2_epochs": 1.0, "batch_size": 16}
STAGES = ["[1/6] drawing", "[2/6] training a byte-level BPE tokenizer", "[3/6] building a tiny LLaVA",
          "[4/6] stage 1:", "[5/6] stage 2:", "[6/6] reloading"]
LIBRARY_LOGS = ("Configuration saved in", "Do not forget to share your model", "loading configuration file")


def run_cli(*args: str, settings: dict | None = None) -> str:
    """`python -m llava_ext.cli ARGS` in a fresh process (its own logging state), with `--quick` meaning `settings`
    when given; stdout and stderr together, newlines untranslated ('\\r' stays: tqdm redraws a bar with it)."""
    if settings is None:
        launcher = ["-m", "llava_ext.cli"]
    else:  # the same main(), `--quick` pointed at `settings` first
        launcher = ["-c", "import sys; from llava_ext.demo import DemoSettings; from llava_ext.cli import main; "
                    f"DemoSettings.quick = classmethod(lambda cls: cls(**{settings!r})); sys.exit(main(sys.argv[1:]))"]
    done = subprocess.run(  # the timeout is a hang guard, not a speed limit
        [sys.executable, *launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=HANG_GUARD_S
    )
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output
    return output


def shown_lines(output: str) -> list[str]:
    """Each line as a terminal leaves it: what follows the line's last '\\r'."""
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


def stage_lines(output: str) -> list[str]:
    return [line for line in shown_lines(output) if re.match(r"\[\d/6\] ", line)]


def test_drawn_shapes_show_the_colour():
    image = draw_shape("square", "blue", random.Random(0))
    assert image.size == (32, 32)
    red, green, blue = image.getpixel((16, 16))  # the shape sits near the centre
    assert blue > 180 and red < 120 and green < 140


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`llava-ext demo --quick` run once, as README's command 1 runs it: (output folder, everything it printed)."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_cli("demo", "--quick", "--output-dir", str(out))


@needs_image_assistant_masks
def test_demo_quick_prints_a_line_a_stage_bars_and_the_report_only(quick_demo):
    _, output = quick_demo
    stages = stage_lines(output)
    assert [line[: len(start)] for line, start in zip(stages, STAGES)] == STAGES and len(stages) == 6, output
    for log in (*LIBRARY_LOGS, "'loss':", "'train_runtime'", "Writing model shards", "Loading weights"):
        assert log not in output, f"{log!r} printed:\n{output}"
    assert output.count("\n") < 40, output  # was 634 with transformers' INFO logs
    shown = shown_lines(output)
    assert any(re.match(r"stage 2: 100%.*loss=\d", line) for line in shown), output  # the loss rides in the bar
    assert any(re.match(r"held-out questions: 100%.* 100/100 ", line) for line in shown), output
    assert any(line.startswith("Accuracy on 100 held-out questions: ") for line in shown), output


@needs_image_assistant_masks
def test_demo_quick_learns_well_above_chance(quick_demo, capsys):
    out, report = quick_demo
    line = next(line for line in report.splitlines() if line.startswith("Accuracy on 100 held-out questions"))
    accuracy = float(line.split(": ")[1].split("%")[0]) / 100
    chance = 0.5 * (1 / len(SHAPES) + 1 / len(COLORS))  # one question per image, about shape or colour
    assert accuracy >= 2 * chance, report
    # the checkpoint reloaded by the demo carries its code
    assert (out / "final" / "modeling_llava_ext.py").is_file()
    assert (out / "final" / "processing_llava_ext.py").is_file()
    # the held-out set is also an eval file, and `llava-ext eval` scores the demo's model the same way
    heldout = out / "data" / "heldout.jsonl"
    assert len(heldout.read_text().splitlines()) == 100
    assert main(["eval", str(out / "final"), "--data", str(heldout)]) == 0
    scored = capsys.readouterr().out
    assert f"exact match:     {round(accuracy * 100)}/100" in scored, scored


@needs_image_assistant_masks
def test_demo_verbose_brings_back_the_library_logs(tmp_path):
    output = run_cli("demo", "--quick", "--verbose", "--output-dir", str(tmp_path), settings=TINY)
    assert all(log in output for log in LIBRARY_LOGS), output  # transformers' INFO logs
    assert output.count("'train_runtime'") == 2, output  # Trainer's own bar writes each stage's logs, a line each
    assert "Writing model shards" in output and "Loading weights" in output, output
    assert len(stage_lines(output)) == 6, output


@needs_image_assistant_masks
def test_demo_no_progress_draws_no_bars_and_leaves_transformers_switches_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DemoSettings, "quick", classmethod(lambda cls: cls(**TINY)))
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    assert main(["demo", "--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err and "it/s" not in captured.err, captured
    assert "'train_runtime'" not in captured.out, captured.out  # Trainer's PrinterCallback was replaced
    assert [line[: len(start)] for line, start in zip(stage_lines(captured.out), STAGES)] == STAGES, captured.out
    assert "Accuracy on 4 held-out questions: " in captured.out, captured.out
    # in-process callers keep their settings
    assert (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()) == (verbosity, bars)


def test_demo_shapes_recipe_matches_the_demo_stage2():
    from pathlib import Path

    from llava_ext.train import parse_config

    model_args, _, training_args = parse_config(Path(__file__).parent.parent / "configs" / "demo-shapes.yaml")
    settings = DemoSettings()
    assert training_args.learning_rate == settings.stage2_learning_rate
    assert training_args.num_train_epochs == settings.stage2_epochs
    assert training_args.per_device_train_batch_size == settings.batch_size
    assert not (model_args.freeze_vision_tower or model_args.freeze_projector or model_args.freeze_language_model)
