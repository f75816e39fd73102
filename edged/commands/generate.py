"""`edged generate`: run one prompt on one model directory, no daemon."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_INVALID = 2
EXIT_LOAD = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with one ONNX model directory (no daemon)",
        description="Generate a completion for PROMPT with an optimum-exported ONNX model "
                    "directory (the folder holding config.json and model.onnx, e.g. "
                    "models/demo/small; not a zoo folder). Greedy unless --temperature > 0.",
        epilog="exit status: 0 done, 2 invalid arguments or prompt (e.g. too long for the "
               "model's context), 3 the model directory could not be loaded")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message through the model's chat template")
    p.add_argument("--provider", action="append", default=None, metavar="NAME",
                   help="onnxruntime execution provider, in order (repeatable; default CPU)")
    p.add_argument("--no-fallback", action="store_true",
                   help="fail instead of warning when the provider asked for is not used")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="intra-op threads (0 = onnxruntime's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (with --json: one JSON line per delta)")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text ('-' reads stdin)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edged.zoo import GenerationParams, InvalidRequestError, ZooError, load_model

    def fail(code: int, message: str) -> int:
        print(f"edged generate: error: {message}", file=sys.stderr)
        return code

    prompt: str | bytes = sys.stdin.buffer.read() if args.prompt == "-" else args.prompt
    if isinstance(prompt, str):  # undecodable argv bytes arrive as lone surrogates
        prompt = prompt.encode("utf-8", "surrogateescape")
    try:
        params = GenerationParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=tuple(args.stop))
    except InvalidRequestError as exc:
        return fail(EXIT_INVALID, str(exc))
    hint = model_dir_hint(Path(args.model))
    if hint:
        return fail(EXIT_LOAD, hint)
    try:
        model = load_model(args.model, args.provider, allow_fallback=not args.no_fallback,
                           intra_op_threads=args.threads)
    except ZooError as exc:
        return fail(EXIT_LOAD, str(exc))

    def on_delta(text: str) -> None:
        if args.json:
            print(json.dumps({"delta": text}, ensure_ascii=False), flush=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        if args.chat:
            text = prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt
            result = model.generate(messages=[{"role": "user", "content": text}], params=params,
                                    on_delta=on_delta if args.stream else None)
        else:
            result = model.generate(prompt, params=params,
                                    on_delta=on_delta if args.stream else None)
    except UnicodeDecodeError as exc:
        return fail(EXIT_INVALID, f"prompt is not valid UTF-8: byte {exc.start}")
    except InvalidRequestError as exc:
        return fail(EXIT_INVALID, str(exc))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    elif args.stream:
        print()
    else:
        print(result.text)
    return 0


def model_dir_hint(path: Path) -> str | None:
    """What to point --model at when `path` is a zoo, or the parent of an export's `onnx/`."""
    if (path / "config.json").is_file():
        return None
    if (path / "onnx" / "config.json").is_file():
        return f"{path} holds its model in onnx/: use --model {path / 'onnx'}"
    inner = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file()) \
        if path.is_dir() else []
    if (path / "zoo.toml").is_file() or inner:
        what = "a zoo (it has zoo.toml)" if (path / "zoo.toml").is_file() else "not a model"
        pick = f"; its models: {', '.join(inner)} (e.g. --model {path / inner[0]})" if inner \
            else ""
        return (f"{path} is {what}: --model takes one model directory{pick}; to serve the "
                f"whole zoo use `edged serve`")
    return None
