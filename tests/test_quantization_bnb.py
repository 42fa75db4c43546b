"""bitsandbytes 4/8-bit loading and QLoRA training (`bits: 4`).

The CPU tests check what can be checked without a GPU: the skip list against the modules a tiny model really has (as
transformers' own matcher reads it), the `bits` checks and their messages, raised before anything loads (library, CLI),
the QLoRA recipe, and `merge-lora` on a 16-bit / quantized base. The `needs_cuda_bnb` tests load a tiny checkpoint in
4 and 8 bits and run a 2-step QLoRA `train` with its merge; they need a CUDA GPU and bitsandbytes, skip elsewhere, and
have not yet been run on a GPU.
"""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import needs_image_assistant_masks, tiny_llava_config, write_color_dataset
from PIL import Image
from safetensors.torch import load_file
from test_data import make_processor
from torch import nn
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration, LlavaExtModel
from llava_ext import train as train_module
from llava_ext.quantization import bitsandbytes_config, check_bitsandbytes_environment
from llava_ext.train import ModelArguments, apply_lora, build_trainer, merge_lora, parse_config, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_cuda_bnb = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_BNB),
    reason=f"bitsandbytes 4/8-bit needs a CUDA GPU and bitsandbytes (pip install 'llava-ext[quant]'); here CUDA is "
    f"{'available' if torch.cuda.is_available() else 'missing'} and bitsandbytes "
    f"{'installed' if HAS_BNB else 'not installed'}. Not yet run on a GPU.",
)
NOWHERE = ["--model_name_or_path", "/nonexistent/model", "--data_path", "/nonexistent/data.json", "--bf16", "false"]


def tiny_model(model_class=LlavaExtForConditionalGeneration, vision="clip"):
    return model_class(LlavaExtConfig(**tiny_llava_config(vision=vision).to_dict()))


def ids_under(module: nn.Module) -> set[int]:
    return {id(sub) for sub in module.modules()}


# --- CPU: the config and what it skips ---


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("model_class", [LlavaExtForConditionalGeneration, LlavaExtModel])
def test_skip_list_keeps_vision_projector_lm_head_and_converts_the_language_model(model_class, vision):
    # transformers' own matcher, the one replace_with_bnb_linear calls for every module (5.17 and 5.24)
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = tiny_model(model_class, vision)
    inner = model.model if hasattr(model, "model") else model
    kept = ids_under(inner.vision_tower) | ids_under(inner.multi_modal_projector)
    if hasattr(model, "lm_head"):
        kept |= {id(model.lm_head)}
    language_model = ids_under(inner.language_model)
    skip = bitsandbytes_config(4).llm_int8_skip_modules
    # replace_with_bnb_linear converts exactly the modules whose type is nn.Linear
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    converted = {name for name, _ in linears if should_convert_module(name, skip)}
    expected = {name for name, module in linears if id(module) in language_model}
    assert expected and len(expected) < len(linears)
    assert converted == expected
    assert all(id(module) in kept for name, module in linears if name not in expected)


def test_config_is_nf4_double_quant_bf16_and_8bit_is_llm_int8():
    four = bitsandbytes_config(4)
    assert isinstance(four, BitsAndBytesConfig)
    assert (four.load_in_4bit, four.load_in_8bit) == (True, False)
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("nf4", True)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert "lm_head" in four.llm_int8_skip_modules  # the list replaces transformers' default skips
    eight = bitsandbytes_config(8, torch.float16)
    assert (eight.load_in_4bit, eight.load_in_8bit) == (False, True)
    # saved into config.json with a quantized model and read back by from_pretrained
    assert BitsAndBytesConfig.from_dict(four.to_dict()).llm_int8_skip_modules == four.llm_int8_skip_modules


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 3}, r"bits=3 is not a bitsandbytes width; use 4 \(NF4, QLoRA\) or 8"),
    ({"bits": 16}, r"bits=16 is not a bitsandbytes width"),
    ({"bits": 4, "quant_type": "int4"}, r"quant_type='int4' is not a 4-bit type; use 'nf4'"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bitsandbytes_config(**kwargs)


# --- CPU: the bits checks in training ---


def test_qlora_recipe_is_the_lora_recipe_plus_4_bits():
    lora = yaml.safe_load((CONFIGS / "finetune-lora.yaml").read_text())
    qlora = yaml.safe_load((CONFIGS / "finetune-qlora.yaml").read_text())
    assert set(qlora) - set(lora) == {"bits", "quant_type", "double_quant"}
    assert {key for key in lora if lora[key] != qlora[key]} == {"output_dir"}
    model_args, _, training_args = parse_config(CONFIGS / "finetune-qlora.yaml", ["--data_path", "d.json",
                                                                                   "--bf16", "false"])
    assert (model_args.bits, model_args.quant_type, model_args.double_quant) == (4, "nf4", True)
    assert (model_args.lora_enable, model_args.lora_r, model_args.lora_alpha) == (True, 128, 256)
    assert training_args.gradient_checkpointing
    default, _, _ = parse_config(CONFIGS / "finetune-lora.yaml", ["--data_path", "d.json", "--bf16", "false"])
    assert default.bits == 16


@pytest.mark.parametrize(("overrides", "message"), [
    (["--bits", "5"], r"bits=5 is not supported; use 16 \(no quantization\), 8 or 4"),
    (["--bits", "32"], r"bits=32 is not supported"),
    (["--lora_enable", "false"], r"bits=4 trains LoRA adapters .* needs lora_enable: true"),
    (["--bits", "8", "--lora_enable", "false"], r"bits=8 trains LoRA adapters .* needs lora_enable: true"),
])
def test_bad_bits_are_named_when_the_recipe_is_read(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse_config(CONFIGS / "finetune-qlora.yaml", [*NOWHERE, *overrides])


def test_model_arguments_check_bits_themselves():
    with pytest.raises(ValueError, match=r"bits=4 trains LoRA adapters"):
        ModelArguments(model_name_or_path="m", bits=4)
    assert ModelArguments(model_name_or_path="m", bits=8, lora_enable=True).bits == 8


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything loads a model or a processor."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or processor was loaded before the bits check")

    for name in ("AutoModelForImageTextToText", "AutoProcessor"):
        monkeypatch.setattr(getattr(train_module, name), "from_pretrained", refuse)


@pytest.mark.parametrize("bits", ["4", "8"])
def test_bits_without_cuda_raise_before_anything_loads(monkeypatch, no_loading, bits):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    args = parse_config(CONFIGS / "finetune-qlora.yaml", [*NOWHERE, "--bits", bits])
    # the data and model paths do not exist: reaching them would raise FileNotFoundError instead
    with pytest.raises(ValueError, match=rf"bits={bits} loads the language model with bitsandbytes, which needs a "
                                         r"CUDA GPU.*use bits: 16 \(--bits 16\)"):
        build_trainer(*args)
    with pytest.raises(ValueError, match=r"needs a CUDA GPU"):
        train(*args)


def test_llava_ext_train_with_bits_4_stops_at_the_cuda_check(monkeypatch, no_loading):
    from llava_ext.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises((ValueError, SystemExit), match=r"bits=4 loads the language model with bitsandbytes, which "
                                                       r"needs a CUDA GPU"):
        main(["train", str(CONFIGS / "finetune-qlora.yaml"), *NOWHERE])


def test_bits_without_bitsandbytes_name_the_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec now answers "not installed"
    with pytest.raises(ImportError, match=r"bits=4 needs bitsandbytes.*pip install 'llava-ext\[quant\]'"):
        check_bitsandbytes_environment(4)
    with pytest.raises(ValueError, match=r"bits=2 is not a bitsandbytes width"):
        check_bitsandbytes_environment(2)


def test_bits_with_use_cpu_are_refused(monkeypatch, no_loading):
    monkeypatch.setattr(train_module, "check_bitsandbytes_environment", lambda bits: None)  # as on a CUDA machine
    args = parse_config(CONFIGS / "finetune-qlora.yaml", [*NOWHERE, "--use_cpu", "true"])
    with pytest.raises(ValueError, match=r"bits=4 trains on the GPU with bitsandbytes but use_cpu is set"):
        build_trainer(*args)


# --- CPU: merge-lora loads the base unquantized, in its own dtype ---


@pytest.fixture
def bf16_base_and_adapter(tmp_path):
    base = tiny_model().to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "base"), lora_enable=True, lora_r=2, lora_alpha=4)
    adapted = apply_lora(tiny_model().to(torch.bfloat16), model_args)
    with torch.no_grad():  # lora_B starts at zero; make the merge change the weights
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    adapted.save_pretrained(tmp_path / "adapter")
    make_processor().save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_merge_lora_keeps_the_base_dtype(tmp_path, bf16_base_and_adapter):
    base, adapter = bf16_base_and_adapter
    merge_lora(adapter, tmp_path / "merged", base_model=str(base))
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert {tensor.dtype for tensor in after.values()} == {torch.bfloat16}
    changed = [name for name in before if "language_model" in name and not torch.equal(before[name], after[name])]
    assert changed  # the adapter was folded in


def test_merge_lora_refuses_a_quantized_base(tmp_path, bf16_base_and_adapter):
    base, adapter = bf16_base_and_adapter
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = bitsandbytes_config(4).to_dict()  # as save_pretrained writes a 4-bit model
    (base / "config.json").write_text(json.dumps(config, default=str))
    with pytest.raises(ValueError, match=r"is saved quantized \(bitsandbytes\).*pass its 16-bit checkpoint"):
        merge_lora(adapter, tmp_path / "merged", base_model=str(base))
    assert not (tmp_path / "merged").exists()


# --- CUDA: loading in 4/8 bits, QLoRA training (not yet run on a GPU) ---


@pytest.fixture(scope="module")
def gpu_workdir(tmp_path_factory):
    """A tiny saved llava_ext checkpoint whose language-model linears have bitsandbytes-friendly sizes (multiples of
    64: every backend's 4-bit kernels take them), its processor, and a 4-sample LLaVA-format dataset."""
    root = tmp_path_factory.mktemp("bnb")
    config = tiny_llava_config().to_dict()
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_key_value_heads=4, head_dim=16)
    torch.manual_seed(0)
    LlavaExtForConditionalGeneration(LlavaExtConfig(**config)).save_pretrained(root / "init")
    make_processor().save_pretrained(root / "init")
    write_color_dataset(root)
    return root


def prompt_batch(device) -> dict[str, torch.Tensor]:
    batch = make_processor()(images=Image.new("RGB", (32, 32), (255, 0, 0)), text="<image>\nWhat color is it?",
                             return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


# bits -> (bitsandbytes class, least share of positions whose argmax agrees with the 16-bit model, largest relative
# logit error). Random tiny weights are NF4's worst case; bitsandbytes 0.50.2's CPU backend gave 100% / 0.11 (4-bit)
# and 100% / 0.011 (8-bit) on this test's model and prompt.
QUANTIZED = {4: ("Linear4bit", 0.7, 0.3), 8: ("Linear8bitLt", 0.85, 0.1)}


@needs_cuda_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_load_in_4_and_8_bits_keeps_vision_tower_and_projector_16_bit(gpu_workdir, bits):
    import bitsandbytes as bnb

    class_name, least_agreement, largest_error = QUANTIZED[bits]
    reference = AutoModelForImageTextToText.from_pretrained(gpu_workdir / "init", dtype=torch.bfloat16).cuda().eval()
    quantized = AutoModelForImageTextToText.from_pretrained(
        gpu_workdir / "init", quantization_config=bitsandbytes_config(bits), dtype=torch.bfloat16, device_map="auto"
    ).eval()
    assert getattr(quantized, f"is_loaded_in_{bits}bit")
    modules = dict(quantized.named_modules())
    language_model = ids_under(reference.model.language_model)
    linears = [name for name, module in reference.named_modules() if type(module) is nn.Linear]
    for name in linears:
        module = modules[name]
        if id(reference.get_submodule(name)) in language_model:
            assert isinstance(module, getattr(bnb.nn, class_name)), name
        else:  # vision tower, projector, lm_head
            assert type(module) is nn.Linear and module.weight.dtype == torch.bfloat16, name
            assert torch.equal(module.weight, reference.get_submodule(name).weight), name

    batch = prompt_batch("cuda")
    with torch.no_grad():
        # the image features go through unquantized modules only: the same as the 16-bit model's
        torch.testing.assert_close(
            quantized.get_image_features(batch["pixel_values"].bfloat16()).pooler_output,
            reference.get_image_features(batch["pixel_values"].bfloat16()).pooler_output,
        )
        generated = quantized.generate(**batch, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert generated.shape == (1, batch["input_ids"].shape[1] + 16)
        # greedy tokens scored by the 16-bit model on the same sequence (teacher forcing, so one early difference
        # does not change every later token)
        full = {**batch, "input_ids": generated, "attention_mask": torch.ones_like(generated)}
        ours, theirs = (model(**full).logits[0, -17:-1].float() for model in (quantized, reference))
    agreement = (generated[0, -16:] == theirs.argmax(-1)).float().mean().item()
    assert agreement >= least_agreement, agreement
    error = ((ours - theirs).norm() / (theirs - theirs.mean()).norm()).item()
    assert error < largest_error, error


@needs_cuda_bnb
@needs_image_assistant_masks
def test_qlora_train_two_steps_saves_an_adapter_that_merges(gpu_workdir, monkeypatch):
    output = gpu_workdir / "qlora"
    shutil.rmtree(output, ignore_errors=True)
    args = parse_config(CONFIGS / "finetune-qlora.yaml", [
        "--model_name_or_path", str(gpu_workdir / "init"), "--data_path", str(gpu_workdir / "data.json"),
        "--output_dir", str(output), "--dataloader_num_workers", "0", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--model_max_length", "128",
        "--max_steps", "2", "--learning_rate", "1e-2", "--lora_r", "4", "--lora_alpha", "8",
    ])
    trainers = []  # train() builds its trainer here, kept to look at the model it trained
    build = train_module.build_trainer
    monkeypatch.setattr(train_module, "build_trainer", lambda *a: trainers.append(build(*a)) or trainers[-1])
    result = train(*args)

    import bitsandbytes as bnb

    model = trainers[0].model
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    assert result.global_step == 2 and math.isfinite(result.training_loss) and result.training_loss > 0
    losses = [entry["loss"] for entry in trainers[0].state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

    adapter = load_file(output / "adapter_model.safetensors")
    assert any("multi_modal_projector" in name for name in adapter)
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (gpu_workdir / "init").resolve())

    merged_dir = merge_lora(output, gpu_workdir / "qlora-merged", overwrite=True)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert not any("bitsandbytes" in type(module).__module__ for module in merged.modules())
    assert {tensor.dtype for tensor in load_file(Path(merged_dir) / "model.safetensors").values()} == {
        tensor.dtype for tensor in load_file(gpu_workdir / "init" / "model.safetensors").values()}
    with_adapter = AutoModelForImageTextToText.from_pretrained(output).eval()  # the 16-bit base + the adapter
    base = AutoModelForImageTextToText.from_pretrained(gpu_workdir / "init").eval()
    batch = prompt_batch("cpu")
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(**batch).logits for m in (merged, with_adapter, base))
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
