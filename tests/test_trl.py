"""TRL's `SFTTrainer` trains a llava_ext model: its assistant-only labels match `LlavaExtDataCollator`'s, the loss
falls, LoRA works, and what `save_model` writes reloads with `trust_remote_code=True` in a Python without llava_ext.
"""

import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from conftest import (
    BOS_ID, HANG_GUARD_S, IMAGE_TOKEN_ID, NUM_PATCHES, isolated_env, needs_image_assistant_masks, tiny_llava_config,
)
from PIL import Image
from test_data import make_processor

from llava_ext import LlavaExtConfig, LlavaExtForConditionalGeneration
from llava_ext.data import LlavaExtDataCollator
from llava_ext.train import lora_target_regex

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}
QUESTION = "What color is it?"

# Loads what `trainer.save_model` wrote (plus a LoRA adapter on its base) where `import llava_ext` fails, and writes the
# processor's inputs and the model's logits for one image question.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llava_ext"] = None  # any `import llava_ext` now raises ImportError
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir, adapter_dir, image_path, question, out_path = sys.argv[1:]
    processor = AutoProcessor.from_pretrained(adapter_dir or model_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    module = type(model).__module__.split(".")[0]
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                                 {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    torch.save({"input_ids": inputs["input_ids"], "logits": logits, "module": module}, out_path)
    """
)


def trl_dataset():
    """Two image questions with answers of different lengths, in TRL's conversational `messages` + `images` format."""
    return datasets.Dataset.from_dict({
        "messages": [
            [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": name}] for name in COLORS
        ],
        "images": [[Image.new("RGB", (32, 32), rgb)] for rgb in COLORS.values()],
    })


def collator_samples():
    """The same conversations as `trl_dataset`, written independently in the format `LlavaExtDataCollator` reads."""
    return [
        {"messages": [
            {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32), rgb)},
                                         {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": name}]},
        ]}
        for name, rgb in COLORS.items()
    ]


def sft_config(output_dir, **overrides):
    """A few CPU steps; every step sees both conversations in dataset order (batch 2 = the whole dataset)."""
    values = dict(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=2, learning_rate=5e-3,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", use_cpu=True, bf16=False,
        report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
    )
    return trl.SFTConfig(**{**values, **overrides})


def train_and_capture(model, args, **trainer_kwargs):
    """Run `SFTTrainer`, recording each batch as the model receives it (a forward pre-hook)."""
    batches = []

    def record(module, args, kwargs):
        if module.training:
            batches.append({key: value.detach().clone() for key, value in kwargs.items() if torch.is_tensor(value)})

    model.register_forward_pre_hook(record, with_kwargs=True)
    processor = make_processor()
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=trl_dataset(), processing_class=processor, **trainer_kwargs
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, processor, batches, losses


def tiny_model():
    return LlavaExtForConditionalGeneration(LlavaExtConfig(**tiny_llava_config().to_dict()))


def reload_without_llava_ext(tmp_path, model_dir, adapter_dir=""):
    """Run RELOAD_SCRIPT in a fresh Python; returns its saved inputs and logits."""
    image_path = tmp_path / "question.png"
    Image.new("RGB", (32, 32), COLORS["red"]).save(image_path)
    env = isolated_env(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(model_dir), str(adapter_dir), str(image_path), QUESTION,
         str(tmp_path / "reloaded.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(tmp_path / "reloaded.pt"), Image.open(image_path)


def logits_in_process(model, processor, image) -> tuple[torch.Tensor, torch.Tensor]:
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    conversation = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        return inputs["input_ids"], model.eval()(**inputs).logits


@needs_image_assistant_masks
def test_full_finetuning_labels_match_the_collator_loss_falls_and_reloads(tmp_path):
    model = tiny_model()
    trainer, processor, batches, losses = train_and_capture(
        model, sft_config(tmp_path / "out", assistant_only_loss=True, learning_rate=2e-2)
    )
    assert len(batches) == len(losses) == 6

    ours = LlavaExtDataCollator(processor)(collator_samples())
    batch = batches[0]
    for key in ("input_ids", "attention_mask", "labels"):  # more in test_sft_batch_has_one_bos_and_equals_the_collator
        assert torch.equal(batch[key], ours[key]), key

    assert losses[-1] < 0.5 * losses[0], losses  # the same two conversations every step

    trainer.save_model(tmp_path / "out")
    reloaded, image = reload_without_llava_ext(tmp_path, tmp_path / "out")
    assert reloaded["module"] == "transformers_modules"  # the checkpoint's code, not an installed llava_ext
    input_ids, expected = logits_in_process(trainer.model, processor, image)
    assert torch.equal(reloaded["input_ids"], input_ids)
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)


@needs_image_assistant_masks
def test_sft_batch_has_one_bos_and_equals_the_collator(tmp_path):
    # TRL tokenizes with add_special_tokens=False: the BOS is the one the chat template renders
    _, processor, batches, _ = train_and_capture(
        tiny_model(), sft_config(tmp_path / "out", max_steps=1, assistant_only_loss=True)
    )
    batch = batches[0]
    assert batch["input_ids"][:, 0].eq(BOS_ID).all() and batch["input_ids"].eq(BOS_ID).sum(dim=1).tolist() == [1, 1]
    ours = LlavaExtDataCollator(processor)(collator_samples())
    assert batch.keys() >= {"input_ids", "attention_mask", "labels", "pixel_values"}
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], ours[key]), key
    torch.testing.assert_close(batch["pixel_values"], ours["pixel_values"])
    # the answers and their "</s>" are all that is trained on: "red</s>" (4 tokens), "blue</s>" (5 tokens)
    assert batch["labels"].ne(-100).sum(dim=1).tolist() == [4, 5]
    # Vicuna v1 for the first conversation, written out: one BOS, "USER: ", the image's tokens, question, answer
    encode = partial(processor.tokenizer.encode, add_special_tokens=False)
    expected = [BOS_ID, *encode("USER: "), *[IMAGE_TOKEN_ID] * NUM_PATCHES, *encode(f"\n{QUESTION} ASSISTANT: red</s>")]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected


def test_lora_trains_and_the_adapter_reloads_without_llava_ext(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")  # the adapter records this folder as its base model
    model = LlavaExtForConditionalGeneration.from_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=lora_target_regex(model), modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    trainer, processor, batches, losses = train_and_capture(
        model, sft_config(tmp_path / "out", learning_rate=2e-2), peft_config=lora
    )  # TRL's defaults otherwise: gradient checkpointing on, loss on every token
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "multi_modal_projector" in name for name in trainable)

    trainer.save_model(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    reloaded, image = reload_without_llava_ext(tmp_path, tmp_path / "base", tmp_path / "out")
    assert reloaded["module"] == "transformers_modules"
    input_ids, expected = logits_in_process(trainer.model, processor, image)
    assert torch.equal(reloaded["input_ids"], input_ids)
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # the adapter changed the model: the test would see a lost adapter
        untrained = base.eval()(input_ids=input_ids, pixel_values=processor.image_processor(image, return_tensors="pt")[
            "pixel_values"]).logits
    assert not torch.allclose(untrained, expected, atol=1e-3)
