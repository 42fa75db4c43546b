"""`llava-ext demo --quick`: the offline newcomer path end to end, through the real CLI."""

import random

from conftest import needs_image_assistant_masks

from llava_ext.cli import main
from llava_ext.demo import COLORS, SHAPES, draw_shape


def test_drawn_shapes_show_the_colour():
    image = draw_shape("square", "blue", random.Random(0))
    assert image.size == (32, 32)
    red, green, blue = image.getpixel((16, 16))  # the shape sits near the centre
    assert blue > 180 and red < 120 and green < 140


@needs_image_assistant_masks
def test_demo_quick_learns_well_above_chance(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    line = next(line for line in report.splitlines() if line.startswith("Accuracy on 100 held-out questions"))
    accuracy = float(line.split(": ")[1].split("%")[0]) / 100
    chance = 0.5 * (1 / len(SHAPES) + 1 / len(COLORS))  # one question per image, about shape or colour
    assert accuracy >= 2 * chance, report
    # the checkpoint reloaded by the demo carries its code
    assert (tmp_path / "final" / "modeling_llava_ext.py").is_file()
    assert (tmp_path / "final" / "processing_llava_ext.py").is_file()
    # the held-out set is also an eval file, and `llava-ext eval` scores the demo's model the same way
    heldout = tmp_path / "data" / "heldout.jsonl"
    assert len(heldout.read_text().splitlines()) == 100
    assert main(["eval", str(tmp_path / "final"), "--data", str(heldout)]) == 0
    scored = capsys.readouterr().out
    assert f"exact match:     {round(accuracy * 100)}/100" in scored, scored


def test_demo_shapes_recipe_matches_the_demo_stage2():
    from pathlib import Path

    from llava_ext.demo import DemoSettings
    from llava_ext.train import parse_config

    model_args, _, training_args = parse_config(Path(__file__).parent.parent / "configs" / "demo-shapes.yaml")
    settings = DemoSettings()
    assert training_args.learning_rate == settings.stage2_learning_rate
    assert training_args.num_train_epochs == settings.stage2_epochs
    assert training_args.per_device_train_batch_size == settings.batch_size
    assert not (model_args.freeze_vision_tower or model_args.freeze_projector or model_args.freeze_language_model)
