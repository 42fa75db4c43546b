"""Answer quality of bf16, int8 and int4 weight-only against fp32, on a trained checkpoint and its held-out questions.

Each precision answers every question twice: through `llava-ext eval`'s batched, uncompiled `generate()`
(`llava_ext.evaluate.generate_answers`), and through `ChatSession`'s compiled decode, one fresh question at a time, as
`llava-ext chat` serves it. Printed per precision and path: exact-match answers and how many answers equal fp32's
batched ones. The demo model makes a checkpoint and its questions in under two minutes, with no download:

    llava-ext demo --output-dir llava-ext-demo
    python benchmarks/bench_quality.py llava-ext-demo/final --data llava-ext-demo/data/heldout.jsonl
"""

import argparse
import json
import time

from llava_ext.chat import ChatSession, load_model_and_processor
from llava_ext.compat import load_image
from llava_ext.evaluate import generate_answers, is_exact_match, load_eval_records

PRECISIONS = {
    "fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("auto", "int8"), "int4": ("auto", "int4"),
}


def served_answers(model, processor, records, max_new_tokens: int) -> tuple[list[str], bool]:
    """Each question in a fresh conversation of one `ChatSession` (its default: static cache, compiled decode)."""
    session = ChatSession(model, processor)
    answers = []
    for record in records:
        session.reset()
        answer = session.ask(record.question, images=[load_image(str(record.image))], max_new_tokens=max_new_tokens)
        answers.append(answer.strip())
    return answers, session.compile


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained llava_ext checkpoint directory (model + processor)")
    parser.add_argument("--data", required=True, help="its evaluation .jsonl (see `llava-ext eval --help`)")
    parser.add_argument(
        "--precisions", default="fp32,bf16,int8,int4", help="comma-separated, from fp32,bf16,int8,int4"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", help="also write every answer here")
    args = parser.parse_args()
    names = args.precisions.split(",")
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown or "fp32" not in names:
        parser.error(f"--precisions must include fp32 and name only {', '.join(PRECISIONS)}; got {args.precisions!r}")

    records = load_eval_records(args.data)
    answers = {}
    for name in ["fp32"] + [name for name in names if name != "fp32"]:
        dtype, quantize = PRECISIONS[name]
        model, processor = load_model_and_processor(args.checkpoint, "cpu", dtype, quantize=quantize)
        start = time.perf_counter()
        batched = generate_answers(model, processor, records, batch_size=16, max_new_tokens=args.max_new_tokens,
                                   show_progress=False)
        served, compiled = served_answers(model, processor, records, args.max_new_tokens)
        answers[name] = {"batched": batched, "served": served}
        for path, label in (("batched", "eval, batched generate()"), ("served", "ChatSession" + ", compiled" * compiled)):
            found = answers[name][path]
            correct = sum(is_exact_match(answer, record.answers) for answer, record in zip(found, records))
            same = sum(a == b for a, b in zip(found, answers["fp32"]["batched"]))
            print(f"{name:5s} {label:26s} exact {correct}/{len(records)}, same answer as fp32 {same}/{len(records)}")
        print(f"      ({model.dtype}, {time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(answers, file, indent=1)


if __name__ == "__main__":
    main()
