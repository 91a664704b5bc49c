"""``ferry generate``: offline generation with the torch engine, no servers involved."""

from __future__ import annotations

import argparse
import json
import sys

from workers.embedded import DEFAULT_MODEL


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="generate text offline (no servers)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model folder, .gguf file, or embedded name (default: %(default)s)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message with the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    # Heavy imports (torch) only when the command runs.
    from workers.engine.factory import build_torch_engine
    from workers.engine.types import EngineRequest, InvalidRequestError, SamplingParams
    from workers.loader import ModelLoadError

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
        )
        if not args.prompt:
            raise InvalidRequestError("the prompt is empty: pass some text with --prompt")
        built = build_torch_engine(args.model)
        tok = built.loaded.tokenizer
        if args.chat:  # the template writes its own special tokens
            text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            prompt_ids = tuple(tok.encode(text, add_special_tokens=False))
        else:
            prompt_ids = tuple(tok.encode(args.prompt, add_special_tokens=True))
        request = EngineRequest(request_id="generate-0", prompt_token_ids=prompt_ids,
                                sampling=sampling)
        (out,) = built.engine.generate([request])
    except (ModelLoadError, InvalidRequestError, ValueError) as exc:
        print(f"ferry generate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "text": out.text,
            "token_ids": list(out.token_ids),
            "prompt_token_ids": list(prompt_ids),
            "cached_tokens": out.num_cached_tokens,
            "finish_reason": out.finish_reason.value if out.finish_reason else None,
            "model": built.model_name,
        }))
    else:
        print(out.text)
    return 0
