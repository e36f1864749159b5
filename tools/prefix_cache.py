"""What the prefix cache saves through the server: `serve` on the demo pair twice, with and without
--enable-prefix-caching, driven in turn (A B A B) with the same requests, each a chat whose earlier turn (a solved
demo problem, the same for every request, as a system prompt or few-shot examples are) comes before its question.

    .venv/bin/python tools/prefix_cache.py [--problems 24] [--repeats 2] [--levels 1 16] [--policies large neural:0.7]

Prints, per policy and concurrency, for each server: output tokens/s, TTFT p50, accuracy, and the pool's hit
rate from /metrics; then the cached / uncached ratio of each pair of runs.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics

import httpx

from collab_decode.bench.load import RestSender, drive_server
from collab_decode.bench.suite import ServerProcess
from collab_decode.bench.workload import Workload
from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.pairs import pair_routers
from collab_decode.serve.cli import default_threads, usable_cores

MAX_TOKENS = 330  # the demo models see 512 positions: the earlier turn, the question and the answer fit


def earlier_turn(tokenizer) -> str:
    """The chat's earlier turn: the training problem with the shortest worked solution, solved."""
    earlier = min(problems("train", 200), key=lambda p: len(p.solution))
    return chat_prompt(earlier.question) + earlier.solution + tokenizer.eos_token + "\n"


def chat_workload(tokenizer, num_problems: int) -> Workload:
    """Held-out problems, each after the same earlier turn."""
    history = earlier_turn(tokenizer)
    probs = problems("heldout", num_problems)
    prompts = [tokenizer(history + chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    return Workload(prompts, [p.answer for p in probs], MAX_TOKENS)


def hits(url: str) -> tuple[float, float]:
    """(tokens looked up, tokens found) in the small pool's prefix cache so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text

    def value(name: str) -> float:
        m = re.search(rf'^collab_decode_prefix_cache_{name}_total{{pool="small"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("queries"), value("hits")


async def run(server: ServerProcess, workload: Workload, policy: str, level: int) -> dict:
    sender = RestSender(server.url, workload)
    try:
        before = hits(server.url)
        m = await drive_server(sender, policy, len(workload) if level == 1 else 3 * level, level)
        after = hits(server.url)
    finally:
        await sender.close()
    queried = after[0] - before[0]
    return {"tokens_per_s": m.tokens_per_s, "ttft_ms": m.percentiles_ms("ttft_s", (50,))[0],
            "accuracy": m.accuracy(workload), "hit_rate": (after[1] - before[1]) / queried if queried else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--policies", nargs="+", default=["large", "neural:0.7"])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir("small")))
    workload = chat_workload(tokenizer, args.problems)
    lengths = [len(p) for p in workload.prompt_ids]
    shared = len(tokenizer(earlier_turn(tokenizer), add_special_tokens=False)["input_ids"])
    print(f"{len(workload)} problems, prompts {min(lengths)}-{max(lengths)} tokens ({shared} of them the shared "
          f"earlier turn), max_tokens {MAX_TOKENS}", flush=True)
    routers = [f"{name}={path}" for name, path in pair_routers("demo").items()]
    servers = {cached: ServerProcess(str(checkpoint_dir("small")), str(checkpoint_dir("large")), default_threads(),
                                     routers, usable_cores(), prefix_caching=cached) for cached in (True, False)}
    try:
        for policy in args.policies:
            for level in args.levels:
                ratios = {"tokens_per_s": [], "ttft_ms": []}
                for r in range(args.repeats):
                    got = {}
                    for cached, server in servers.items():
                        got[cached] = asyncio.run(run(server, workload, policy, level))
                        g = got[cached]
                        print(f"{policy} at {level}, repeat {r + 1}, {'cached  ' if cached else 'uncached'}: "
                              f"{g['tokens_per_s']:7.1f} tok/s, TTFT p50 {g['ttft_ms']:7.2f} ms, accuracy "
                              f"{g['accuracy']:.3f}, hit rate {g['hit_rate']:.3f}", flush=True)
                    for key in ratios:
                        ratios[key].append(got[True][key] / got[False][key])
                print(f"{policy} at {level}: cached / uncached tokens/s "
                      f"{', '.join(f'{x:.3f}' for x in ratios['tokens_per_s'])} (median "
                      f"{statistics.median(ratios['tokens_per_s']):.3f}); TTFT p50 "
                      f"{', '.join(f'{x:.3f}' for x in ratios['ttft_ms'])}", flush=True)
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
