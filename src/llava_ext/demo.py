"""An offline end-to-end demo: train a tiny LLaVA on procedurally drawn shapes, on CPU, in a few minutes.

    draw shapes (PIL) -> LLaVA-format JSON + PNGs -> train a byte-level BPE tokenizer (tokenizers)
      -> tiny LLaVA from config (CLIP-style ViT + Llama) -> stage 1 (projector) -> stage 2 (everything)
      -> save with its code -> reload with AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True)
      -> greedy answers on held-out images -> exact-answer accuracy

Everything runs through the library's public path: `LlavaConversationDataset`, `LlavaExtDataCollator`, the
`llava-ext train` machinery (`llava_ext.train.train`) and the bundled `llava-1.5` chat template. Nothing is downloaded.
The stage-2 recipe is also in `configs/demo-shapes.yaml`, to rerun by hand on the generated data.

`run_demo` prints nothing itself: it names each of its six stages to an `on_stage` callback ("[4/6] stage 1: ...")
and draws progress bars, and it leaves transformers' log level to the caller (`llava-ext demo --verbose` sets INFO).
"""

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# tqdm.auto, as Trainer's own bars: the demo's bars follow `show_progress` as Trainer's do, not transformers'
# `disable_progress_bar()` switch (through compat.tqdm), which `llava-ext demo` flips to hide its load/save bars.
from tqdm.auto import tqdm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    ProgressCallback,
    TrainerCallback,
    TrainingArguments,
)

from .configuration_llava_ext import LlavaExtConfig
from .data import LlavaConversationDataset
from .evaluate import eval_records_from_conversations
from .modeling_llava_ext import LlavaExtForConditionalGeneration
from .train import DataArguments, ModelArguments, train
from .vision import num_image_features

# The world the demo draws from
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200)}
SHAPE_QUESTIONS = ("What shape is shown?", "Which shape is in the image?", "Name the shape.")
COLOR_QUESTIONS = ("What color is the shape?", "Which color does the shape have?", "Name the color.")
CHANCE_ACCURACY = 0.5 * (1 / len(SHAPES) + 1 / len(COLORS))  # half the questions about each

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
NUM_STAGES = 6  # data, tokenizer, model, stage 1, stage 2, reload + evaluate: the "[k/6]" of each on_stage line


@dataclass
class DemoSettings:
    """Sizes and schedule of one demo run (`quick()` is the CI variant)."""

    # Images and the tiny ViT
    image_size: int = 32
    patch_size: int = 8  # 16 patches + CLS = 17 image tokens a sample: short sequences, fast steps
    vision_hidden_size: int = 128  # the ViT learns from scratch: width is cheap next to the LM and helps shapes most
    vision_layers: int = 3
    vision_feature_select_strategy: Literal["default", "full"] = "full"  # the CLS token is one more summary token
    # Data and schedule
    train_images: int = 10000
    eval_questions: int = 200
    stage1_epochs: float = 0.5
    stage2_epochs: float = 3.0
    batch_size: int = 32
    stage1_learning_rate: float = 1e-3
    stage2_learning_rate: float = 2e-3
    seed: int = 0
    show_progress: bool = True

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_images=1200, eval_questions=100, stage1_epochs=0.25, stage2_epochs=2.0)


@dataclass
class DemoResult:
    """What a demo run reports."""

    accuracy: float
    num_questions: int
    seconds: float
    output_dir: str
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, answer)
    chance: float = CHANCE_ACCURACY


def draw_shape(shape: str, color: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One `size` x `size` RGB image: a `color` `shape` of random size and place on a noisy grey background."""
    noise = np.random.default_rng(rng.randrange(2**32)).normal(128, 15, (size, size, 3))
    base = rng.randint(60, 190)
    background = np.clip(noise - 128 + base, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    # Large and near the centre, in a narrow size range: a circle's rim and a square's corners never reach the same
    # distance from the centre, so 8-pixel patches tell them apart (sizes 0.33-0.45 left ~10% of circles as squares).
    radius = rng.uniform(0.38, 0.45) * size
    cx, cy = (size / 2 + rng.uniform(-0.06, 0.06) * size for _ in range(2))
    fill = tuple(int(min(255, max(0, c + rng.randint(-20, 20)))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        half = radius * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=fill)
    elif shape == "cross":
        arm = radius * 0.35
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)
    else:
        raise ValueError(f"shape={shape!r} is not drawable; choose one of {SHAPES}.")
    return image


def make_shapes_dataset(
    folder: str | Path, num_images: int, seed: int, split: str, image_size: int = 32, show_progress: bool = False
) -> Path:
    """Draw `num_images` shapes into `folder/images/` and write `folder/{split}.json` in the LLaVA format.

    Each sample asks about the shape and the colour in random order (stage 2), and `folder/{split}-captions.json`
    holds one caption per image ("a red circle", stage 1). `show_progress` draws a progress bar over the images.

    Returns:
        The path of the question-answer JSON file.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    qa, captions = [], []
    for index in tqdm(range(num_images), desc=f"{split} images", unit="image", disable=not show_progress):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        name = f"images/{split}-{index:05d}.png"
        draw_shape(shape, color, rng, image_size).save(folder / name)
        turns = [(rng.choice(SHAPE_QUESTIONS), shape), (rng.choice(COLOR_QUESTIONS), color)]
        rng.shuffle(turns)
        conversation = []
        for turn, (question, answer) in enumerate(turns):
            conversation.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversation.append({"from": "gpt", "value": answer})
        qa.append({"id": f"{split}-{index}", "image": name, "conversations": conversation})
        captions.append({"id": f"{split}-{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": f"a {color} {shape}"}]})
    (folder / f"{split}-captions.json").write_text(json.dumps(captions))
    path = folder / f"{split}.json"
    path.write_text(json.dumps(qa))
    return path


def train_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` with the `tokenizers` library (BOS prepended, `<image>` special)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # no progress display: it trains in well under a second
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=256,
    )


def build_tiny_llava(tokenizer: PreTrainedTokenizerFast, settings: DemoSettings) -> LlavaExtForConditionalGeneration:
    """A tiny LLaVA from config: a CLIP-style ViT sized by `settings` + a 2-layer Llama (hidden 128)."""
    vision = CLIPVisionConfig(
        hidden_size=settings.vision_hidden_size, intermediate_size=2 * settings.vision_hidden_size,
        num_hidden_layers=settings.vision_layers, num_attention_heads=4, image_size=settings.image_size,
        patch_size=settings.patch_size, projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    strategy = settings.vision_feature_select_strategy
    config = LlavaExtConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=num_image_features(vision, settings.image_size, settings.image_size, strategy),
        vision_feature_layer=-1, vision_feature_select_strategy=strategy,
    )
    return LlavaExtForConditionalGeneration(config)


def build_processor(tokenizer: PreTrainedTokenizerFast, settings: DemoSettings):
    """The library's processor with the `llava-1.5` template, resizing to the tiny ViT's input size."""
    from .image_processing_llava_ext import LlavaExtImageProcessor
    from .processing_llava_ext import LlavaExtProcessor

    size = settings.image_size
    image_processor = LlavaExtImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaExtProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=settings.patch_size,
        vision_feature_select_strategy=settings.vision_feature_select_strategy, chat_template="llava-1.5",
        num_additional_image_tokens=1,
    )


class _LossInProgressBar(ProgressCallback):
    """Trainer's progress bar, named `description`, with the last logged loss as its postfix instead of a printed line
    per log (`ProgressCallback.on_log` writes each logs dict above the bar)."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:  # None on processes other than the main one
            self.training_bar.set_description(self.description, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


def _progress_callback(settings: DemoSettings, verbose: bool, description: str) -> TrainerCallback | None:
    """How a stage shows its progress: Trainer's own display when verbose, else the bar with the loss, or nothing."""
    if verbose:
        return None  # its bar writing every logged loss on a line, or PrinterCallback printing them (--no-progress)
    return _LossInProgressBar(description) if settings.show_progress else TrainerCallback()


def _training_arguments(output_dir: Path, settings: DemoSettings, stage: int) -> TrainingArguments:
    stage1 = stage == 1
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.stage1_epochs if stage1 else settings.stage2_epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.stage1_learning_rate if stage1 else settings.stage2_learning_rate,
        weight_decay=0.0,
        warmup_steps=0.03,
        lr_scheduler_type="cosine",
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        dataloader_num_workers=1,  # collation (tokenize + image processing) overlaps the step
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.show_progress,
        # the caller's log level stays: "info" here made Trainer turn transformers' INFO logs on for the whole process
        log_level="passive",
    )


@torch.inference_mode()
def evaluate(
    model_dir: str | Path, data_path: str | Path, num_questions: int, batch_size: int = 50, show_progress: bool = False
):
    """Reload `model_dir` with the Auto classes (`trust_remote_code=True`) and answer one question per image greedily.

    `show_progress` draws a progress bar over the questions.

    Returns:
        `(accuracy, [(question, expected, answer), ...])`.
    """
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"  # generation continues every row from its last real token
    dataset = LlavaConversationDataset(data_path)
    num_questions = min(num_questions, len(dataset))
    results = []
    progress = tqdm(total=num_questions, desc="held-out questions", unit="question", disable=not show_progress)
    for start in range(0, num_questions, batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, num_questions))]
        conversations = [item["messages"][:1] for item in items]  # the question (with its image); not the answer
        expected = [  # (question, answer) of each sample's first turn
            tuple(next(b["text"] for b in message["content"] if b["type"] == "text") for message in item["messages"][:2])
            for item in items
        ]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        )
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        results += [(q, a, answer.strip()) for (q, a), answer in zip(expected, answers)]
        progress.update(len(items))
    progress.close()
    accuracy = sum(answer == expected for _, expected, answer in results) / len(results)
    return accuracy, results


def run_demo(
    output_dir: str | Path = "llava-ext-demo",
    quick: bool = False,
    show_progress: bool = True,
    settings: DemoSettings | None = None,
    on_stage: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> DemoResult:
    """Generate data, build a tiny LLaVA, train stage 1 and stage 2, reload from disk and measure accuracy.

    Args:
        output_dir (`str`): where data, the initial model, the stage-1 and the final checkpoint go.
        quick (`bool`): the shortened CI schedule (fewer images and steps; accuracy well above chance, not 95%).
        show_progress (`bool`): progress bars for drawing the images, the two training stages (the last logged loss
            as each bar's postfix) and the evaluation.
        settings (`DemoSettings`, *optional*): sizes and schedule; overrides `quick`.
        on_stage (`Callable[[str], None]`, *optional*): called as each of the six stages starts, with one line
            naming it, e.g. `"[4/6] stage 1: training the projector on 1200 captions (0.25 epochs)"`.
        verbose (`bool`): Trainer's own progress display, which writes every logged loss and the run's summary on
            lines of their own. transformers' INFO logs also need its log level set, e.g.
            `transformers.logging.set_verbosity_info()`; the demo leaves it as it finds it.

    Returns:
        `DemoResult` with accuracy on held-out images, wall time and a few sample answers.
    """
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    settings.show_progress = show_progress
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices gain nothing from more threads; the data worker takes the other core
    try:
        return _run_demo_steps(Path(output_dir), settings, on_stage or (lambda line: None), verbose)
    finally:
        torch.set_num_threads(threads)


def _epochs(count: float) -> str:
    """A number of epochs in words: 1 epoch, 0.25 epochs."""
    return f"{count:g} epoch" + ("" if count == 1 else "s")


def _run_demo_steps(
    output_dir: Path, settings: DemoSettings, on_stage: Callable[[str], None], verbose: bool
) -> DemoResult:
    def stage(number: int, description: str) -> None:
        on_stage(f"[{number}/{NUM_STAGES}] {description}")

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    data = output_dir / "data"
    size, progress = settings.image_size, settings.show_progress
    stage(1, f"drawing {settings.train_images} training and {settings.eval_questions} held-out images into {data}")
    train_path = make_shapes_dataset(data, settings.train_images, settings.seed, "train", size, progress)
    eval_path = make_shapes_dataset(data, settings.eval_questions, settings.seed + 1, "heldout", size, progress)
    # the held-out questions also as an eval file: `llava-ext eval OUT/final --data OUT/data/heldout.jsonl`
    eval_records_from_conversations(eval_path, data / "heldout.jsonl")

    stage(2, "training a byte-level BPE tokenizer on the training texts")
    records = json.loads(train_path.read_text()) + json.loads((data / "train-captions.json").read_text())
    corpus = [turn["value"] for record in records for turn in record["conversations"]]
    corpus += ["USER: ASSISTANT: SYSTEM: A chat between a curious human and an artificial intelligence assistant."]
    tokenizer = train_tokenizer(corpus)
    processor = build_processor(tokenizer, settings)
    initial = output_dir / "initial"
    stage(3, f"building a tiny LLaVA (CLIP-style ViT + 2-layer Llama) from config into {initial}")
    model = build_tiny_llava(tokenizer, settings)
    model.save_pretrained(initial)
    processor.save_pretrained(initial)

    # Stage 1: align the projector to a frozen (here: random) LM on captions. Stage 2: the tiny ViT is trained from
    # scratch, so unlike LLaVA-1.5 there is nothing pretrained to protect and every part trains.
    stage1, final = output_dir / "stage1", output_dir / "final"
    images, epochs1, epochs2 = settings.train_images, _epochs(settings.stage1_epochs), _epochs(settings.stage2_epochs)
    stage(4, f"stage 1: training the projector on {images} captions ({epochs1})")
    train(
        ModelArguments(model_name_or_path=str(initial), freeze_vision_tower=True, freeze_language_model=True),
        DataArguments(data_path=str(data / "train-captions.json")),
        _training_arguments(stage1, settings, stage=1),
        _progress_callback(settings, verbose, "stage 1"),
    )
    stage(5, f"stage 2: training everything on {images} question pairs ({epochs2})")
    train(
        ModelArguments(model_name_or_path=str(stage1), freeze_vision_tower=False, freeze_language_model=False),
        DataArguments(data_path=str(train_path)),
        _training_arguments(final, settings, stage=2),
        _progress_callback(settings, verbose, "stage 2"),
    )
    stage(6, f"reloading {final} (trust_remote_code=True) and answering {settings.eval_questions} held-out questions")
    accuracy, results = evaluate(final, eval_path, settings.eval_questions, show_progress=progress)
    return DemoResult(
        accuracy=accuracy, num_questions=len(results), seconds=time.perf_counter() - started,
        output_dir=str(final), samples=results[:6],
    )


__all__ = [
    "DemoResult",
    "DemoSettings",
    "build_processor",
    "build_tiny_llava",
    "draw_shape",
    "evaluate",
    "make_shapes_dataset",
    "run_demo",
    "train_tokenizer",
]
