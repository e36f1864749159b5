"""`collab-decode`: generate, serve, demo (train / eval), bench. Each subcommand's --help is complete."""

from __future__ import annotations

import argparse
import json
import sys

from collab_decode.engine.args import add_engine_args, engine_from_args

HIGHLIGHT, RESET = "\x1b[1;30;43m", "\x1b[0m"  # large-model tokens: black on yellow


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate (default: what the context leaves after the prompt)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_generate(args: argparse.Namespace) -> int:
    from collab_decode.sampling import SamplingParams

    policy = args.policy or args.default_policy  # --default-policy counts when --policy is not given
    engine = engine_from_args(args, policy_needs_large=policy not in ("small",))
    if args.chat:  # the server's tokenization of a chat, so `generate --chat` and the API agree
        from collab_decode.serve.requests import chat_prompt_ids

        prompt_ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = engine.tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    max_tokens = args.max_tokens if args.max_tokens is not None else engine.max_tokens_left(len(prompt_ids))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    result = engine.generate([prompt_ids], sampling, policy)[0]
    if result.error is not None:
        print(f"error: the request failed after {len(result.token_ids)} tokens: {result.error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "provenance": result.provenance,
                          "finish_reason": result.finish_reason, "stats": result.stats}))
        return 0
    tok = engine.tokenizer
    pieces = []
    for token, source in zip(result.token_ids, result.provenance):
        piece = tok.decode([token], skip_special_tokens=True)
        pieces.append(f"{HIGHLIGHT}{piece}{RESET}" if source == "large" and piece else piece)
    print("".join(pieces))
    s = result.stats
    print(f"\n[{policy}] {len(result.token_ids)} tokens: {s['small_tokens']} small, {s['large_tokens']} large "
          f"(large share {s['large_share']:.1%}, {s['large_calls']} large calls, {s['catchup_tokens']} catch-up tokens)"
          f"; finish: {result.finish_reason}"
          + (f"; {HIGHLIGHT}highlighted{RESET} = large model" if s['large_tokens'] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collab-decode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, showing which model wrote each token")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--policy", default=None,
                     help="small | large | random:p | entropy:t | confidence:t | step-entropy:t | "
                          "neural:PATH[:t] | speculative:k (default: --default-policy)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, provenance, stats")
    gen.set_defaults(func=cmd_generate)

    from collab_decode.demo.cli import add_demo_parser
    add_demo_parser(sub)
    from collab_decode.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from collab_decode.serve.cli import add_serve_parser
    add_serve_parser(sub)
    from collab_decode.labels.cli import add_label_parser
    add_label_parser(sub)
    from collab_decode.trainer.cli import add_train_router_parser
    add_train_router_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
