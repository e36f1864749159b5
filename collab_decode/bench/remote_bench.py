"""What the remote large model costs: the demo pair with its large model local and behind an endpoint
(`--large-url`, e.g. vLLM serving the demo large model), same problems, batch 1, alternating in one run.

Per policy and placement it reports tokens/s, the large share, large calls, catch-up tokens per call and the
milliseconds per large call (time in the large model's forward / calls), plus the endpoint's own decode
speed (one completion of --max-tokens tokens, the endpoint's loop). From these, the large share at which
routing through the endpoint stops paying:

    time per token with routing  ~  t_small + share * t_call        (the small model runs at every position)
    pays against the large model alone while  t_small + share * t_call < t_alone
    break-even share  =  (t_alone - t_small) / t_call

    python -m collab_decode.bench.remote_bench --large-url http://127.0.0.1:8000/v1 --num-problems 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from collab_decode.backends.remote import RemoteConfig
from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.bench.measure import timed_config
from collab_decode.engine.loading import build_engine
from collab_decode.sampling import SamplingParams


def run(engine, prompts: list[list[int]], policy: str, max_tokens: int) -> dict:
    """Prompts one at a time (batch 1); totals of tokens, seconds and time in each model."""
    totals = {"tokens": 0, "large_tokens": 0, "large_calls": 0, "catchup": 0, "seconds": 0.0, "small_s": 0.0,
              "large_s": 0.0}
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for prompt in prompts:
        seq = engine.seqs[engine.add_request(prompt, sampling, policy)]
        start = time.perf_counter()
        while not seq.finished:
            engine.step()
            totals["small_s"] += engine.last_step.small_forward
            totals["large_s"] += engine.last_step.large_forward
        totals["seconds"] += time.perf_counter() - start
        stats = seq.stats
        totals["tokens"] += seq.num_output_tokens
        totals["large_tokens"] += stats.num_large_tokens
        totals["large_calls"] += stats.num_large_calls
        totals["catchup"] += stats.num_catchup_tokens
    return totals


def summary(t: dict) -> dict:
    calls, tokens = max(1, t["large_calls"]), t["tokens"]
    return {"tok_per_s": round(tokens / t["seconds"], 1), "ms_per_token": round(1e3 * t["seconds"] / tokens, 2),
            "large_share": round(t["large_tokens"] / tokens, 4), "large_calls": t["large_calls"],
            "catchup_per_call": round(t["catchup"] / calls, 2),
            "ms_per_large_call": round(1e3 * t["large_s"] / calls, 2),
            "ms_small_per_token": round(1e3 * t["small_s"] / tokens, 3)}


def endpoint_decode_ms(engine, prompt: list[int], max_tokens: int) -> float:
    """ms per token of the endpoint's own decode loop: one completion of max_tokens tokens."""
    backend = engine.backends["large"]
    body = {"model": backend.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    start = time.perf_counter()
    answer = backend.client.post_many("/v1/completions", [body])[0]
    seconds = time.perf_counter() - start
    if isinstance(answer, Exception):
        raise answer
    return 1e3 * seconds / answer["usage"]["completion_tokens"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large-url", required=True, help="the endpoint serving the demo large model")
    p.add_argument("--num-problems", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--policies", nargs="+", default=["large", "entropy:0.6", "small"])
    p.add_argument("--threads", type=int, default=1, help="torch threads here (the endpoint may share the CPU)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    small, large = checkpoint_dir("small"), checkpoint_dir("large")
    engines = {"local": build_engine(small, large, config=timed_config()),
               "remote": build_engine(small, large, config=timed_config(), remote=RemoteConfig(url=args.large_url))}
    prompts = [engines["local"].tokenizer(chat_prompt(q.question), add_special_tokens=False)["input_ids"]
               for q in problems("heldout", args.num_problems)]
    for engine in engines.values():  # warm-up
        run(engine, prompts[:1], "large", 16)
    runs: dict[tuple[str, str], list[dict]] = {}
    decode_ms = []
    for repeat in range(args.repeats):
        for policy in args.policies:
            for place, engine in engines.items():
                if policy == "small" and place == "remote":
                    continue  # no large model involved
                runs.setdefault((place, policy), []).append(summary(run(engine, prompts, policy, args.max_tokens)))
        decode_ms.append(endpoint_decode_ms(engines["remote"], prompts[0], args.max_tokens))
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    report = {"rows": [{"place": place, "policy": policy, **median_row(r)} for (place, policy), r in runs.items()],
              "endpoint_decode_ms_per_token": round(statistics.median(decode_ms), 2)}
    report["break_even"] = break_even(report)
    engines["remote"].close()
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def median_row(rows: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def break_even(report: dict) -> dict:
    """The large share below which routing through the endpoint beats the large model alone (local, or
    the endpoint's own decode loop). A large call costs what a token of `large` costs (one call per token, no
    small model); routed positions of a routing policy also catch up, measured as its ms per large call."""
    rows = {(r["place"], r["policy"]): r for r in report["rows"]}
    t_small = rows[("local", "small")]["ms_per_token"]
    calls = {place: rows[(place, "large")]["ms_per_token"] for place in ("local", "remote")}
    routed = [r for (place, policy), r in rows.items() if place == "remote" and policy not in ("large", "small")]
    t_call = max([calls["remote"]] + [r["ms_per_large_call"] for r in routed])
    out = {"t_small_ms": t_small, "t_call_local_ms": calls["local"], "t_call_remote_ms": calls["remote"],
           "overhead_per_call_ms": round(calls["remote"] - calls["local"], 2), "t_call_routed_remote_ms": t_call}
    for name, t_alone in (("vs_local_large", calls["local"]),
                          ("vs_endpoint_alone", report["endpoint_decode_ms_per_token"])):
        out[name] = round(max(0.0, (t_alone - t_small) / t_call), 4)
    return out


if __name__ == "__main__":
    main()
