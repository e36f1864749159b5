"""What the prefix cache saves through the server: `serve` on the demo pair twice, with and without
--enable-prefix-caching, driven in turn (A B A B) with the same requests, each a chat whose earlier turns (two demo
problems and their answers, the same for every request, as a system prompt or few-shot examples are) come before
its question. Every run asks questions no run before it asked: what the cache finds is the earlier turns.

    .venv/bin/python tools/prefix_cache.py [--problems 24] [--repeats 2] [--levels 1 16] [--policies large neural:0.7]

Prints, per policy and concurrency, for each server: output tokens/s, TTFT p50, accuracy and each pool's hit rate
(from /metrics), how many answers are the same with and without the cache; then the cached / uncached ratio of
each pair of runs.
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
from collab_decode.demo.task import STEP_DELIMITER, problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.pairs import pair_routers
from collab_decode.serve.cli import default_threads, usable_cores

MAX_TOKENS = 330  # the demo models see 512 positions: the earlier turns, the question and the answer fit


def earlier_turns(tokenizer) -> str:
    """The chat's earlier turns: two training problems, each answered by its answer line (the demo models see 512
    positions; with max_tokens and the question, ~180 are left)."""
    return "".join(chat_prompt(p.question) + p.solution.split(STEP_DELIMITER)[-1] + tokenizer.eos_token + "\n"
                   for p in problems("train", 2))


def chat_workload(tokenizer, num_problems: int, offset: int) -> Workload:
    """Held-out problems [offset, offset + num_problems), each after the same earlier turns."""
    history = earlier_turns(tokenizer)
    probs = problems("heldout", num_problems, offset)
    prompts = [tokenizer(history + chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    return Workload(prompts, [p.answer for p in probs], MAX_TOKENS)


def hits(url: str) -> dict[str, tuple[float, float]]:
    """Per pool, (tokens looked up, tokens found) in its prefix cache so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for kind in ("queries", "hits"):
        for pool, value in re.findall(rf'^collab_decode_prefix_cache_{kind}_total{{pool="(\w+)"}} (\S+)$', text, re.M):
            out.setdefault(pool, {})[kind] = float(value)
    return {pool: (v.get("queries", 0.0), v.get("hits", 0.0)) for pool, v in out.items()}


async def run(server: ServerProcess, workload: Workload, policy: str, level: int) -> dict:
    sender = RestSender(server.url, workload)
    try:
        before = hits(server.url)
        m = await drive_server(sender, policy, len(workload), level)
        after = hits(server.url)
    finally:
        await sender.close()
    rates = {}
    for pool, (queried, hit) in after.items():
        q0, h0 = before.get(pool, (0.0, 0.0))
        if queried > q0:
            rates[pool] = (hit - h0) / (queried - q0)
    return {"tokens_per_s": m.tokens_per_s, "ttft_ms": m.percentiles_ms("ttft_s", (50,))[0],
            "accuracy": m.accuracy(workload), "hit_rate": rates, "texts": [r.text for r in m.results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=24, help="requests of a run at concurrency 1 (3 x the "
                        "concurrency above it), each a held-out problem no other run of the server asked")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--policies", nargs="+", default=["large", "neural:0.7"])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir("small")))
    workload = chat_workload(tokenizer, args.problems, 0)
    lengths = [len(p) for p in workload.prompt_ids]
    shared = len(tokenizer(earlier_turns(tokenizer), add_special_tokens=False)["input_ids"])
    print(f"{len(workload)} problems, prompts {min(lengths)}-{max(lengths)} tokens ({shared} of them the shared "
          f"earlier turns), max_tokens {MAX_TOKENS}", flush=True)
    routers = [f"{name}={path}" for name, path in pair_routers("demo").items()]
    servers = {cached: ServerProcess(str(checkpoint_dir("small")), str(checkpoint_dir("large")), default_threads(),
                                     routers, usable_cores(), prefix_caching=cached) for cached in (True, False)}
    offset = 0
    try:
        for policy in args.policies:
            for level in args.levels:
                ratios = {"tokens_per_s": [], "ttft_ms": []}
                warm_up = chat_workload(tokenizer, level, offset)  # (new batch shapes, the policy's first use)
                offset += level
                for server in servers.values():
                    asyncio.run(run(server, warm_up, policy, level))
                for r in range(args.repeats):
                    got = {}
                    num = args.problems if level == 1 else 3 * level
                    workload = chat_workload(tokenizer, num, offset)  # questions new to both servers
                    offset += num
                    for cached, server in servers.items():
                        got[cached] = asyncio.run(run(server, workload, policy, level))
                        g = got[cached]
                        rates = ", ".join(f"{pool} {rate:.3f}" for pool, rate in g["hit_rate"].items()) or "-"
                        print(f"{policy} at {level}, repeat {r + 1}, {'cached  ' if cached else 'uncached'}: "
                              f"{g['tokens_per_s']:7.1f} tok/s, TTFT p50 {g['ttft_ms']:7.2f} ms, accuracy "
                              f"{g['accuracy']:.3f}, hit rate {rates}", flush=True)
                    same = sum(a == b for a, b in zip(got[True]["texts"], got[False]["texts"]))
                    print(f"  the same answer with and without the cache: {same} of {len(got[True]['texts'])}",
                          flush=True)
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
