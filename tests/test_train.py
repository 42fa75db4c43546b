"""Trainer wiring: parity with transformers' LLaVA, what each recipe trains, checkpoints, LoRA merge, torchrun."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, needs_image_assistant_masks, tiny_llava_config, write_color_dataset
from PIL import Image
from safetensors.torch import load_file
from test_data import SAMPLES, make_processor
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, TrainingArguments

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext import train as train_module
from llava_ext.data import LlavaExtDataCollator, SampleError
from llava_ext.train import (
    LlavaExtTrainer, ModelArguments, build_trainer, freeze_parameters, merge_lora, parse_config, train,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = ["--bf16", "false", "--use_cpu", "true", "--dataloader_num_workers", "0", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--model_max_length", "128"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny LLaVA + processor and a 4-sample LLaVA-format dataset with images."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict()))
    model.save_pretrained(root / "init")
    make_processor().save_pretrained(root / "init")
    write_color_dataset(root)
    return root


def run_recipe(workdir, recipe, name, *extra):
    output = workdir / name
    shutil.rmtree(output, ignore_errors=True)
    args = parse_config(CONFIGS / recipe, [
        "--model_name_or_path", str(workdir / "init"), "--data_path", str(workdir / "data.json"),
        "--output_dir", str(output), *FAST, *extra,
    ])
    train(*args)
    return output, args


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


@needs_image_assistant_masks
def test_one_trainer_step_matches_transformers_llava(tmp_path):
    """A real Trainer step with SGD at lr 1: the weight change is minus the gradient, the log holds the loss."""
    config = tiny_llava_config()
    ours = LlavaExtForConditionalGeneration(LlavaExtConfig(**config.to_dict()))
    ours.save_pretrained(tmp_path / "init")
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "init")
    batch = LlavaExtDataCollator(make_processor())(SAMPLES)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=len(SAMPLES),
        disable_tqdm=True, save_strategy="no",
    )
    losses, updates = [], []
    for model in (ours, reference):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainer = LlavaExtTrainer(model=model, args=args, train_dataset=[dict(batch)], data_collator=lambda x: x[0])
        losses.append(trainer.train().training_loss)
        updates.append({name.replace("vision_tower.vision_model.", "vision_tower."): before[name] - p.detach()
                        for name, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] > 0
    assert updates[0].keys() == updates[1].keys()
    assert sum(bool(update.abs().sum()) for update in updates[0].values()) > 30
    for name in updates[0]:
        torch.testing.assert_close(updates[0][name], updates[1][name], msg=name)


def test_recipe_values_and_overrides():
    model_args, data_args, training_args = parse_config(
        CONFIGS / "pretrain-projector.yaml",
        ["--model_name_or_path", "m", "--data_path", "d.json", "--learning_rate", "5e-4", "--bf16", "false"],
    )
    assert (model_args.freeze_vision_tower, model_args.freeze_projector, model_args.freeze_language_model) == (
        True, False, True)
    assert training_args.learning_rate == 5e-4  # the command line wins
    assert training_args.weight_decay == 0.0 and training_args.warmup_steps == 0.03
    assert training_args.lr_scheduler_type == "cosine" and training_args.gradient_checkpointing
    _, _, stage2 = parse_config(CONFIGS / "finetune.yaml", ["--data_path", "d.json", "--bf16", "false"])
    assert stage2.learning_rate == 2e-5
    lora, _, _ = parse_config(CONFIGS / "finetune-lora.yaml", ["--data_path", "d.json", "--bf16", "false"])
    assert (lora.lora_enable, lora.lora_r, lora.lora_alpha) == (True, 128, 256)


def test_unknown_config_key_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("model_name_or_path: m\ndata_path: d\nlearnig_rate: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learnig_rate'\]"):
        parse_config(tmp_path / "bad.yaml")


@needs_image_assistant_masks
def test_stage1_trains_only_the_projector_and_checkpoints_load(workdir):
    output, _ = run_recipe(workdir, "pretrain-projector.yaml", "stage1", "--max_steps", "3",
                           "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "5")
    before, after = weights(workdir / "init"), weights(output)
    assert before.keys() == after.keys()
    for name in before:
        if "multi_modal_projector" in name:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed in stage 1"
    for folder in (output, output / "checkpoint-2"):  # final and mid-run checkpoints carry code and processor
        assert (folder / "modeling_llava_ext.py").is_file()
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__name__ == "LlavaExtForConditionalGeneration"
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


@needs_image_assistant_masks
def test_stage2_leaves_vision_tower_and_resumes(workdir):
    stage2 = ["--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "1"]
    output, _ = run_recipe(workdir, "finetune.yaml", "stage2", "--max_steps", "1", *stage2)
    assert json.loads((output / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    resumed = parse_config(CONFIGS / "finetune.yaml", [
        "--model_name_or_path", str(workdir / "init"), "--data_path", str(workdir / "data.json"),
        "--output_dir", str(output), *FAST, "--max_steps", "2", *stage2, "--resume_from_checkpoint", "last"])
    assert train(*resumed).global_step == 2
    before, after = weights(workdir / "init"), weights(output)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not any("vision_tower" in name for name in changed)
    assert any("multi_modal_projector" in name for name in changed)
    # on disk the keys follow transformers' llava layout (language_model.model.layers..., language_model.lm_head)
    assert any("language_model" in name and ".layers." in name for name in changed)
    assert any("lm_head" in name for name in changed)


@needs_image_assistant_masks
def test_lora_with_checkpointing_trains_and_merge_matches(workdir):
    output, _ = run_recipe(workdir, "finetune-lora.yaml", "lora", "--max_steps", "2", "--learning_rate", "1e-2",
                           "--lora_r", "4", "--lora_alpha", "8")
    adapter = load_file(output / "adapter_model.safetensors")
    assert any("multi_modal_projector" in name for name in adapter), "projector must be saved with the adapter"
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())
    assert AutoProcessor.from_pretrained(output, trust_remote_code=True) is not None

    merged_dir = merge_lora(output, workdir / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, trust_remote_code=True).eval()
    with_adapter = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    base = AutoModelForImageTextToText.from_pretrained(workdir / "init", trust_remote_code=True).eval()
    batch = LlavaExtDataCollator(make_processor())(SAMPLES)
    batch.pop("labels")
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(**batch).logits for m in (merged, with_adapter, base))
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    before, after = weights(workdir / "init"), weights(merged_dir)
    projector = [name for name in before if "multi_modal_projector" in name]
    assert projector and all(not torch.equal(before[name], after[name]) for name in projector)
    vision = [name for name in before if "vision_tower" in name]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)


@needs_image_assistant_masks
def test_torchrun_two_processes(workdir):
    """`torchrun --nproc_per_node 2 -m llava_ext.cli train ...`: DDP over gloo on CPU, no code change (~15 s)."""
    output = workdir / "ddp"
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llava_ext.cli", "train",
        str(CONFIGS / "finetune.yaml"), "--model_name_or_path", str(workdir / "init"),
        "--data_path", str(with_missing_image(workdir)), "--output_dir", str(output), *FAST, "--max_steps", "3",
        "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "5", "--log_level", "info",
        "--on_bad_sample", "skip",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in result.stdout + result.stderr
    # each process reads its own shard; the flags are summed over both before rank 0 reports, each sample once
    assert result.stderr.count("Train data (on_bad_sample='skip'): skipped 1 of 5 samples: record 1 (id 'gone')") == 1
    for folder in (output, output / "checkpoint-2"):
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__name__ == "LlavaExtForConditionalGeneration"
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_lora_without_peft_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # importing peft now raises ImportError
    with pytest.raises(ImportError, match=r"need peft.*llava-ext\[train\]"):
        merge_lora(tmp_path, tmp_path / "out")


def test_tune_vision_layers_unfreezes_the_last_layers_the_features_read():
    # 3 vision layers, features from hidden state -2 (= the output of layer index 1): layers 0 and 1 are read
    model = LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config(vision_feature_layer=-2).to_dict()))
    trainable = freeze_parameters(model, ModelArguments(model_name_or_path="unused", tune_vision_layers=1))
    vision = {name.split(".")[4] for name in trainable if name.startswith("model.vision_tower.encoder.layers.")}
    assert vision == {"1"}
    assert not any(name.startswith("model.vision_tower.embeddings") for name in trainable)
    with pytest.raises(ValueError, match=r"tune_vision_layers=3 but the features are read after layer 2"):
        freeze_parameters(model, ModelArguments(model_name_or_path="unused", tune_vision_layers=3))


def with_missing_image(workdir) -> Path:
    """workdir's 4 samples plus record 1, 'gone', whose image does not exist."""
    records = json.loads((workdir / "data.json").read_text())
    records.insert(1, dict(records[0], id="gone", image="missing.png"))
    (workdir / "missing.json").write_text(json.dumps(records))
    return workdir / "missing.json"


@needs_image_assistant_masks
def test_bad_samples_stop_the_run_or_are_skipped_and_reported(workdir, caplog):
    records = json.loads((with_missing_image(workdir)).read_text())
    broken = [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]
    records.insert(3, {"id": "broken", "conversations": broken})
    (workdir / "bad.json").write_text(json.dumps(records))
    output = workdir / "skipping"

    def recipe(data, *extra):  # 2 steps of 3 cover the 5 usable samples; a batch never holds only bad ones
        return parse_config(CONFIGS / "finetune.yaml", [
            "--model_name_or_path", str(workdir / "init"), "--data_path", str(workdir / data), "--output_dir",
            str(output), *FAST, "--per_device_train_batch_size", "3", "--max_steps", "2", "--save_strategy", "no",
            "--dataloader_num_workers", "2", *extra])

    with pytest.raises(SampleError, match=r"^Record 3 \(id 'broken'\): a turn has from='bot'.*on_bad_sample='skip'"):
        build_trainer(*recipe("bad.json"))  # the default: a malformed record stops the run before the model loads
    with pytest.raises(SampleError, match=r"Record 1 \(id 'gone'\): cannot read image .*missing\.png"):
        train(*recipe("missing.json"))  # raised in a DataLoader worker, re-raised by the main process

    shutil.rmtree(output, ignore_errors=True)
    with caplog.at_level(logging.WARNING, logger="llava_ext.train"):
        with pytest.warns(UserWarning, match=r"Skipping malformed records .*record 3 \(id 'broken'\)"):
            result = train(*recipe("bad.json", "--on_bad_sample", "skip"))
    assert result.global_step == 2 and result.metrics["train_skipped_samples"] == 2
    assert ("Train data (on_bad_sample='skip'): skipped 2 of 6 samples: record 1 (id 'gone'): cannot read image "
            f"{str(workdir / 'missing.png')!r} (FileNotFoundError") in caplog.text
    assert "; record 3 (id 'broken'): a turn has from='bot'; the LLaVA format uses" in caplog.text
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["log_history"][-1]["train_skipped_samples"] == 2


CPU_AS_IS = FAST[4:]  # without "--bf16 false --use_cpu true"
assert FAST[:4] == ["--bf16", "false", "--use_cpu", "true"]


def parse_caught(*overrides) -> tuple[TrainingArguments, list[str]]:
    """finetune.yaml's TrainingArguments and every warning parse_config gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, training_args = parse_config(CONFIGS / "finetune.yaml", ["--data_path", "d.json", *overrides])
    return training_args, [str(warning.message) for warning in caught]


@pytest.mark.parametrize("native", [True, False])
def test_recipe_bf16_without_gpu_picks_the_cpu_precision_with_one_warning(monkeypatch, native):
    monkeypatch.setattr(train_module, "_has_accelerator", lambda: False)
    monkeypatch.setattr(train_module, "_cpu_has_native_bf16", lambda: native)
    training_args, messages = parse_caught()
    assert len(messages) == 1, messages
    if native:
        assert (training_args.bf16, training_args.use_cpu) == (True, True)
        assert messages[0] == (
            "bf16: true and no GPU was found: training on the CPU in bf16, which this CPU computes natively "
            "(AVX512-BF16). Add --use_cpu true to silence this, or --bf16 false to train in fp32."
        )
    else:
        assert (training_args.bf16, training_args.fp16, training_args.use_cpu) == (False, False, True)
        assert messages[0] == (
            "bf16: true but no GPU was found and this CPU has no native bf16 (AVX512-BF16), where bf16 is emulated "
            "and slower than fp32: training on the CPU in fp32. Add --bf16 false to silence this."
        )
    # the flags the messages name silence them
    training_args, messages = parse_caught("--use_cpu", "true") if native else parse_caught("--bf16", "false")
    assert messages == [] and training_args.bf16 == native and training_args.use_cpu == native
    if not native:  # use_cpu asked for on a CPU without bf16: fp32 too, and said why
        training_args, messages = parse_caught("--use_cpu", "true")
        assert not training_args.bf16 and len(messages) == 1 and messages[0].startswith("bf16: true but use_cpu is set")


def test_bf16_on_gpus(monkeypatch):
    """A GPU with bf16 keeps the recipe as is; CUDA without it (pre-Ampere) trains in fp16, with one warning."""
    monkeypatch.setattr(train_module, "_has_accelerator", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    recipe = {"bf16": True, "fp16": False, "bf16_full_eval": False, "use_cpu": False}
    for native, expected in ((True, (True, False)), (False, (False, True))):
        monkeypatch.setattr(train_module, "_cuda_has_native_bf16", lambda: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = train_module._resolve_precision(dict(recipe))
        assert (values["bf16"], values["fp16"], values["use_cpu"]) == (*expected, False)
        assert len(caught) == (0 if native else 1)
    assert "Add --bf16 false --fp16 true" in str(caught[0].message)


@pytest.mark.skipif(train_module._has_accelerator(), reason="checks CPU-only machines; a GPU would train the recipe")
@needs_image_assistant_masks
@pytest.mark.parametrize("native", [True, False])
def test_finetune_recipe_trains_on_a_cpu_without_extra_flags(workdir, monkeypatch, native):
    """configs/finetune.yaml (bf16: true, checkpointing, length grouping) with no --bf16/--use_cpu, on this CPU."""
    monkeypatch.setattr(train_module, "_cpu_has_native_bf16", lambda: native)
    output = workdir / f"cpu-{native}"
    with pytest.warns(UserWarning, match="training on the CPU in " + ("bf16" if native else "fp32")):
        args = parse_config(CONFIGS / "finetune.yaml", [
            "--model_name_or_path", str(workdir / "init"), "--data_path", str(workdir / "data.json"),
            "--output_dir", str(output), *CPU_AS_IS, "--max_steps", "1", "--save_strategy", "no"])
    trainer = build_trainer(*args)
    assert trainer.accelerator.mixed_precision == ("bf16" if native else "no")
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)
    assert result.metrics["train_skipped_samples"] == 0
