"""`collab-decode demo train | eval | queries`: train the demo pair, measure its accuracy, write label queries."""

from __future__ import annotations

import argparse
import json


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the shipped demo pair: train it, evaluate it")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)

    train = demo_sub.add_parser("train", help="train the demo pair on the CPU (seeded; progress and loss shown)")
    train.add_argument("--which", default="both", choices=["small", "large", "both"])
    train.add_argument("--out", default=None, help="output directory (default: the package's shipped checkpoints)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--max-minutes", type=float, default=None,
                       help="wall-clock budget per model (default: the model's own, see demo/train.py SPECS)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in --out (fresh schedule; data continues where it stopped)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's own)")
    train.set_defaults(func=cmd_train)

    ev = demo_sub.add_parser("eval", help="greedy accuracy on held-out problems (the project's evaluator)")
    ev.add_argument("--model", default="small", choices=["small", "large"], help="which demo model runs alone")
    ev.add_argument("--policy", default=None,
                    help="evaluate a routing policy on the pair instead of one model (e.g. entropy:0.6)")
    ev.add_argument("--num-problems", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0, help="first held-out problem index (problems seed..seed+N-1)")
    ev.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ev.add_argument("--json", action="store_true", help="print one JSON object with accuracy and num_problems")
    ev.set_defaults(func=cmd_eval)

    queries = demo_sub.add_parser(
        "queries", help="write demo problems as a query file for `collab-decode label` (training seeds only)",
        description="Demo problems as label queries, one JSON object per line: {\"id\", \"messages\", \"answer\"}. "
                    "Only the training split: held-out problems (seeds from 1e9 up) are kept for evaluation, so "
                    "a router trained on these labels is never calibrated or scored on problems it saw.")
    queries.add_argument("--split", default="train", choices=["train"],
                         help="the task split (only train: held-out seeds are never labelled)")
    queries.add_argument("--num", type=int, required=True, help="how many problems")
    queries.add_argument("--offset", type=int, default=0,
                         help="first problem index of the split (use disjoint ranges for separate sets)")
    queries.add_argument("--out", required=True, help="the JSONL file to write")
    queries.set_defaults(func=cmd_queries)


def cmd_train(args: argparse.Namespace) -> int:
    from collab_decode.demo import CHECKPOINTS
    from collab_decode.demo.train import train_demo_pair

    logs = train_demo_pair(args.out or CHECKPOINTS, which=args.which, seed=args.seed, threads=args.threads,
                           max_minutes=args.max_minutes, resume=args.resume, learning_rate=args.lr)
    for log in logs:
        print(f"{log['model']}: {log['num_params'] / 1e6:.2f}M params, {log['steps']} steps, "
              f"{log['minutes']} min, best validation accuracy {log['best_val_accuracy']:.3f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.evaluate import evaluate
    from collab_decode.engine.loading import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_problems < 1:
        raise ValueError(f"--num-problems must be >= 1, got {args.num_problems}")
    # a model alone is the pair under the policy that runs only that model: the report says what ran
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    policy = args.policy or args.model
    label = f"pair with {args.policy}" if args.policy else f"{args.model} model alone (policy {policy})"
    report = evaluate(engine, args.num_problems, args.seed, policy, progress=not args.json)
    report.pop("results")
    if args.json:
        print(json.dumps({"model": args.model if not args.policy else None, **report}))
    else:
        print(f"{label}: accuracy {report['accuracy']:.1%} ({report['num_correct']}/{report['num_problems']}), "
              f"large share {report['large_share']:.1%}, {report['tokens_per_s']} tokens/s")
    return 0


def cmd_queries(args: argparse.Namespace) -> int:
    from collab_decode.demo.task import HELDOUT_SEED_BASE, SPLIT_BASE, problems

    if args.num < 1 or args.offset < 0:
        raise ValueError(f"--num must be >= 1 and --offset >= 0, got {args.num} and {args.offset}")
    if SPLIT_BASE[args.split] + args.offset + args.num > HELDOUT_SEED_BASE:
        raise ValueError("those problems would reach the held-out seeds: lower --offset or --num")
    lines = [json.dumps({"id": f"demo-{args.split}-{p.seed - SPLIT_BASE[args.split]}",
                         "messages": [{"role": "user", "content": p.question}], "answer": p.answer})
             for p in problems(args.split, args.num, args.offset)]
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    last = args.offset + args.num - 1
    print(f"wrote {len(lines)} {args.split} problems (indices {args.offset}..{last}) to {args.out}")
    return 0
