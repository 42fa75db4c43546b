"""`llava-ext chat`: a terminal chat over `llava_ext.chat.ChatSession`, questions from stdin, answers streamed to stdout.

Notes and errors go to stderr, so a pipe's stdout holds the answers only, one a line.
"""

import argparse
import sys

from ..chat import DEFAULT_MAX_NEW_TOKENS, DTYPES, ChatSession, ContextFullError, load_model_and_processor
from ..compat import load_image
from . import add_quantize_argument, add_subcommand

EXAMPLE = (
    "llava-ext chat llava-hf/llava-1.5-7b-hf --image https://llava-vl.github.io/static/images/view.jpg "
    "--max-new-tokens 256 --temperature 0 --device cuda --dtype float16"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `chat` subcommand to `llava-ext`'s subparsers."""
    parser = add_subcommand(
        subparsers, "chat", example=EXAMPLE,
        help="chat with a LLaVA model in the terminal (streaming, multi-turn, KV cache reused between turns)",
        description=(
            "Interactive chat: type a question and press Enter; the answer streams as it is generated.\n"
            "Commands: '/image PATH_OR_URL' adds an image to the next question, '/reset' starts a new conversation,\n"
            "'/exit' quits. Ctrl-C stops an answer (its question is forgotten); at the prompt it quits.\n"
            "Questions can come from a pipe too, one a line."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="local checkpoint directory or Hugging Face Hub id")
    parser.add_argument("--image", action="append", default=[], help="image path or URL for the first question")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer length limit")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' dtype (auto: the checkpoint's)")
    add_quantize_argument(parser)
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the decode step (static cache; the first answer pays the warm-up). Default: on, except on a "
        "CPU without free memory for the compiled step's pre-packed copy of the weights",
    )
    parser.add_argument(
        "--max-context", type=int, default=None,
        help="context limit in tokens, prompt and answer (default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--on-context-full", choices=["drop_oldest", "error"], default="drop_oldest",
        help="when a question does not fit: forget the oldest turns (default, with a note) or refuse it",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run code shipped with a checkpoint (not needed for llava_ext's own checkpoints)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """The chat loop: questions from stdin, streamed answers to stdout, notes and errors to stderr."""
    model, processor = load_model_and_processor(
        args.model, args.device, args.dtype, args.trust_remote_code, quantize=args.quantize
    )
    session = ChatSession(
        model, processor, system=args.system, compile=args.compile, max_context=args.max_context,
        on_context_full=args.on_context_full,
    )
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generate_kwargs["temperature"] = args.temperature
    interactive = sys.stdin.isatty()
    pending = []
    for path in args.image:
        pending.append(load_image(path))
    if interactive:
        print("Type a question; /image PATH adds an image, /reset starts over, /exit quits.", file=sys.stderr)
        if session.compile:
            print("The first answer also compiles the decode step (a one-off wait; --no-compile skips it).",
                  file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits, without a traceback
            print(file=sys.stderr)
            return 130
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            pending = []
            print("[conversation reset]", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                pending.append(load_image(path))
            except Exception as error:  # a bad path must not end the chat
                print(f"could not load image {path!r}: {error}", file=sys.stderr)
            continue
        answer = None
        try:
            answer = session.ask(line, images=pending, stream=True, **generate_kwargs)
            if session.dropped_turns:
                print(f"[context full: forgot the oldest {session.dropped_turns} turn(s)]", file=sys.stderr)
            for chunk in answer:
                print(chunk, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C during an answer ends the answer, not the chat
            if answer is not None:
                answer.close()  # stops the generation thread; the question is forgotten
            print(flush=True)
            print("[answer interrupted; the question was left out of the conversation]", file=sys.stderr)
            continue
        except ValueError as error:
            print(f"\nerror: {error}", file=sys.stderr)
            if isinstance(error, ContextFullError) and not error.question_alone:
                print("[type /reset to start a new conversation, or chat with --on-context-full drop_oldest]",
                      file=sys.stderr)
            continue
        finally:
            pending = []
        print(flush=True)
    return 0


__all__ = ["EXAMPLE", "add_parser", "run"]
