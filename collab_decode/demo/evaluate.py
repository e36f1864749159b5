"""Greedy accuracy of a model or a routing policy on held-out demo problems, through the engine."""

from __future__ import annotations

import time

from collab_decode.demo.task import is_correct, problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.sampling import SamplingParams

MAX_SOLUTION_TOKENS = 400  # the longest worked solution is ~320 tokens


def evaluate(engine, num_problems: int, offset: int = 0, policy: str = "small", progress: bool = True,
             max_tokens: int = MAX_SOLUTION_TOKENS) -> dict:
    """Run held-out problems [offset, offset + num_problems) greedily; accuracy, large share, speed."""
    probs = problems("heldout", num_problems, offset)
    prompts = [engine.tokenizer(chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    start = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), policy,
                              progress=progress)
    seconds = time.perf_counter() - start
    num_correct = sum(is_correct(r.text, p.answer) for r, p in zip(results, probs))
    num_small = sum(r.stats["small_tokens"] for r in results)
    num_large = sum(r.stats["large_tokens"] for r in results)
    return {
        "policy": policy, "num_problems": num_problems, "offset": offset, "num_correct": num_correct,
        "accuracy": num_correct / num_problems, "large_share": num_large / max(1, num_small + num_large),
        "output_tokens": num_small + num_large, "seconds": round(seconds, 2),
        "tokens_per_s": round((num_small + num_large) / seconds, 1),
        "results": results,
    }
