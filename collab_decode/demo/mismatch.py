"""Where the small model would leave the large model's reasoning, and whether it matters.

1. The large model answers held-out problems greedily (its traces).
2. The small model is teacher-forced along each trace (one forward over prompt + trace, logits at every
   position): a position where its top-1 differs from the trace token is a *mismatch*.
3. For each mismatch on a trace whose answer is right: take the small model's token there and let the
   large model continue greedily to the end. If the final answer is still right the mismatch is
   *neutral* (wording), otherwise *divergent* (the reasoning went elsewhere).

    python -m collab_decode.demo.mismatch --num-problems 50 [--json]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

import torch

from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.demo.task import is_correct, problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.sampling import SamplingParams

MAX_TOKENS = 400


def teacher_forced_top1(engine, token_ids: list[int]) -> list[int]:
    """The small model's greedy choice at every position of token_ids (predicting the next token)."""
    kv = engine.kv["small"]
    seq_id = -1  # a private id outside the engine's own sequences
    kv.allocate(seq_id, len(token_ids))
    try:
        out = engine.backends["small"].forward(ModelInput([SeqChunk(seq_id, token_ids, 0, kv.block_table(seq_id),
                                                                    all_positions=True)]))
    finally:
        kv.free(seq_id)
    return out.all_logits[seq_id][:, :engine.vocab_size].argmax(-1).tolist()


def analyse(engine, num_problems: int, offset: int = 0, progress: bool = True, max_continuations: int = 300,
            seed: int = 0) -> dict:
    """Mismatch counts on the large model's right traces; neutral/divergent from continuing each mismatch.

    Continuing every mismatch costs a full large-model decode each; past `max_continuations` a seeded
    uniform sample of them is continued, and the neutral/divergent rates are estimated from it.
    """
    probs = problems("heldout", num_problems, offset)
    tok = engine.tokenizer
    prompts = [tok(chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    traces = engine.generate(prompts, greedy, "large", progress=progress)
    branches, kinds = [], []  # (problem index, mismatch position) and the token kind
    num_positions = num_mismatches = 0
    for i, (prompt, trace) in enumerate(zip(prompts, traces)):
        if not is_correct(trace.text, probs[i].answer):
            continue  # only right traces say whether a deviation breaks the answer
        top1 = teacher_forced_top1(engine, prompt + trace.token_ids)
        predicted = top1[len(prompt) - 1:len(prompt) - 1 + len(trace.token_ids)]
        num_positions += len(trace.token_ids)
        for pos, (mine, theirs) in enumerate(zip(predicted, trace.token_ids)):
            if mine != theirs:
                num_mismatches += 1
                branches.append((i, pos, prompt + trace.token_ids[:pos] + [mine]))
                kinds.append("digit" if tok.decode([theirs]).strip().isdigit() else "word")
    sampled = list(range(len(branches)))
    if len(sampled) > max_continuations:
        sampled = sorted(random.Random(seed).sample(sampled, max_continuations))
    branches, kinds = [branches[j] for j in sampled], [kinds[j] for j in sampled]
    budgets = [SamplingParams(max_tokens=min(MAX_TOKENS, engine.max_model_len - len(b[2])), temperature=0.0)
               for b in branches]
    continued = engine.generate([b[2] for b in branches], budgets, "large", progress=progress) if branches else []
    labels = []
    for (i, pos, branch), cont in zip(branches, continued):
        text = tok.decode(branch[len(prompts[i]):], skip_special_tokens=True) + cont.text
        labels.append("neutral" if is_correct(text, probs[i].answer) else "divergent")
    by_kind = Counter(zip(kinds, labels))
    num_right = sum(is_correct(t.text, p.answer) for t, p in zip(traces, probs))
    counts = Counter(labels)
    scale = num_mismatches / max(1, len(labels))  # mismatches per continued one
    return {
        "num_problems": num_problems, "num_right_traces": num_right, "num_positions": num_positions,
        "num_mismatches": num_mismatches, "mismatch_rate": num_mismatches / max(1, num_positions),
        "num_continued": len(labels), "neutral": counts["neutral"], "divergent": counts["divergent"],
        "neutral_rate": scale * counts["neutral"] / max(1, num_positions),
        "divergent_rate": scale * counts["divergent"] / max(1, num_positions),
        "by_token_kind": {f"{k}/{label}": n for (k, label), n in sorted(by_kind.items())},
    }


def main(argv: list[str] | None = None) -> None:
    from collab_decode.demo import checkpoint_dir
    from collab_decode.engine.loading import build_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-problems", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="first held-out problem index")
    parser.add_argument("--max-continuations", type=int, default=300,
                        help="continue at most this many mismatches (a seeded sample) to label them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    with torch.inference_mode():
        report = analyse(engine, args.num_problems, args.seed, progress=not args.json,
                         max_continuations=args.max_continuations)
    if args.json:
        print(json.dumps(report))
        return
    n = report["num_positions"]
    print(f"{report['num_right_traces']}/{report['num_problems']} large traces right; {n} positions on them")
    print(f"mismatches: {report['num_mismatches']} ({report['mismatch_rate']:.1%} of positions)")
    print(f"continued {report['num_continued']} of them with the large model:")
    print(f"  neutral:   {report['neutral']} (est. {report['neutral_rate']:.1%} of positions)")
    print(f"  divergent: {report['divergent']} (est. {report['divergent_rate']:.1%} of positions)")
    print(f"  by token kind: {report['by_token_kind']}")


if __name__ == "__main__":
    main()
