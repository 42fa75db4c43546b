"""`llava-ext eval`: the command-line face of `llava_ext.evaluate.evaluate_checkpoint`."""

import argparse

from ..chat import DTYPES
from ..evaluate import EvalResult, Score, evaluate_checkpoint, write_predictions
from . import add_quantize_argument, add_subcommand

EXAMPLE = (
    "llava-ext eval ./llava-ext-demo/final --data ./llava-ext-demo/data/heldout.jsonl "
    "--batch-size 16 --max-new-tokens 8 --output predictions.jsonl"
)
DATA_FORMAT = (
    "The data is JSON Lines, one question a line:\n"
    '  {"id": "q1", "image": "images/q1.png", "question": "What shape is shown?", "answers": ["circle"]}\n'
    "with the image relative to the file (or absolute) and every acceptable answer listed. Answers are compared after\n"
    "lower-casing, collapsing whitespace and dropping trailing punctuation: exact match, and contains-answer (an\n"
    "acceptable answer appears as whole words). Accuracies come with a 95% Wilson score interval."
)


def format_score(name: str, score: Score) -> str:
    """'exact match:     41/100 = 41.0% (95% CI 31.9% to 50.8%)'."""
    lower, upper = score.interval
    return (
        f"{name + ':':<16} {score.correct}/{score.total} = {score.accuracy:.1%} "
        f"({score.confidence:.0%} CI {lower:.1%} to {upper:.1%})"
    )


def format_result(result: EvalResult) -> str:
    return "\n".join([
        format_score("exact match", result.exact_match), format_score("contains answer", result.contains_answer),
    ])


def run(args: argparse.Namespace) -> int:
    try:
        result = evaluate_checkpoint(
            args.checkpoint, args.data, args.batch_size, args.max_new_tokens, device=args.device, dtype=args.dtype,
            quantize=args.quantize, trust_remote_code=args.trust_remote_code, show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"llava-ext eval: error: {error}") from None
    if args.output:
        write_predictions(result, args.output)
    print(f"{result.num_questions} questions from {args.data}, answered by {args.checkpoint}:")
    print(format_result(result))
    if args.output:
        print(f"predictions written to {args.output}")
    return 0


def add_parser(subparsers) -> None:
    """Add the `eval` subcommand."""
    parser = add_subcommand(
        subparsers, "eval", example=EXAMPLE,
        help="score a checkpoint's answers to image questions (exact match, contains-answer)",
        description="Answer every question of a JSONL file greedily, in batches, and report exact-match and "
        "contains-answer accuracy with 95% confidence intervals.\n\n" + DATA_FORMAT,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or Hub id (model and processor)")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="the questions (format above)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="the longest answer, in tokens (default 16)")
    parser.add_argument("--output", metavar="PREDICTIONS.jsonl", help="also write each question's answer and scores")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' dtype (auto: the checkpoint's)")
    add_quantize_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run code shipped with a checkpoint (not needed for llava_ext's own checkpoints)",
    )
    parser.set_defaults(func=run)


__all__ = ["add_parser", "format_result", "format_score", "run"]
