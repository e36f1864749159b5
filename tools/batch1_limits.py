"""How close the engine can come to the two batch-1 lines of issue 13 on this machine, measured in one process.

    .venv/bin/python tools/batch1_limits.py [--problems 24] [--passes 5] [--policy neural:0.7]

Every pass runs the same held-out demo problems one at a time (greedy, as `bench run`'s batch-1 engine runs,
with `serve`'s default threads) four ways, one after the other:

- `small` and `large` alone: the bound's per-token costs, 1 / (c_small / c_large + large share);
- the routed policy (the shipped neural router by default);
- replay: the same engine and policy, with the router's decisions read from the routed run's provenance
  instead of computed (a list lookup, no torch op): what the engine would reach with a router that cost
  nothing. Its tokens must equal the routed run's (checked).

and the small model alone in a minimal decode loop (a forward, the max over its logits, one host copy, the
append and the end checks: no scheduler, no router, no output records) on the same prompts: the floor of the
work outside the forward.

Prints per pass: tokens/s, speedup / bound of the routed run and of the replay, each engine run's own time per
small-model forward (outside the forwards) over the small model's forward, and the routed run's own time a step
by kind of step (a large-model call in it; a router asked; neither) with each kind's share of the steps; then
the medians.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.bench.workload import demo_workload
from collab_decode.demo import checkpoint_dir
from collab_decode.bench.measure import timed_config
from collab_decode.engine.loading import build_engine
from collab_decode.engine.sequence import LARGE, SMALL
from collab_decode.pairs import pair_routers
from collab_decode.routing import Router
from collab_decode.serve.cli import default_threads


class Replay(Router):
    """Routes the output positions in each sequence's state (a set), as recorded: no torch op."""

    def decide(self, inputs) -> list[bool]:
        return [seq.num_output_tokens in positions for positions, seq in zip(inputs.states, inputs.contexts)]


# kinds of engine step, for where the routed policy's own time goes: a large-model call in it; else a router asked
# (the gate let a row through to it); else neither (a gated router not asked, or `small`)
KINDS = ("other", "router asked", "large call")


def engine_run(engine, workload, policy: str, replay: list[set[int]] | None = None) -> dict:
    """Requests one at a time; tokens/s, output ids, and the engine's own time per small forward."""
    sampling, replayer = workload.sampling(), Replay()
    own = small_s = 0.0
    kinds = {kind: [0.0, 0] for kind in KINDS}  # kind of step -> [own seconds, steps]
    forwards = engine.runner.num_forwards[SMALL]
    outputs: list[list[int]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(workload)):
            seq_id = engine.add_request(workload.request(i), sampling, policy, stream_text=False)
            if replay is not None:  # same spec (so the same large-model pools and modes), decisions replayed
                seq = engine.seqs[seq_id]
                seq.router, seq.router_state, seq.reads_top1, seq.gate = replayer, replay[i], False, None
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        outputs.append(out.seq.output_ids)
                t = engine.last_step
                step_own = t.total - t.small_forward - t.large_forward
                own += step_own
                small_s += t.small_forward
                kind = kinds["large call"] if t.large_forward else kinds["router asked"] if t.route else kinds["other"]
                kind[0] += step_own
                kind[1] += 1
    seconds = time.perf_counter() - start
    forwards = engine.runner.num_forwards[SMALL] - forwards
    steps = sum(n for _, n in kinds.values())
    return {"tokens_per_s": sum(map(len, outputs)) / seconds, "outputs": outputs,
            "own_of_small": own / small_s if small_s else None, "own_us": 1e6 * own / max(1, forwards),
            "by_kind": {kind: (1e6 * s / max(1, n), n / max(1, steps)) for kind, (s, n) in kinds.items()}}


def floor_run(engine, workload) -> dict:
    """The small model in a minimal greedy decode loop: its own time per forward outside the forward."""
    backend, kv, eos = engine.backends[SMALL], engine.kv[SMALL], engine.eos_token_ids
    seq_id, max_tokens = -1, workload.max_tokens  # an id the engine never gives
    own = forward_s = 0.0
    steps = 0
    with torch.inference_mode():
        for i in range(len(workload)):
            tokens = list(workload.request(i))
            num_prompt, cached = len(tokens), 0
            kv.allocate(seq_id, num_prompt + max_tokens)
            table = kv.block_table(seq_id)
            while True:
                t0 = time.perf_counter()
                chunk = SeqChunk(seq_id, tokens[cached:], cached, table)
                t1 = time.perf_counter()
                out = backend.forward(ModelInput([chunk]))
                t2 = time.perf_counter()
                cached = len(tokens)
                row_max, token = out.logits.max(dim=-1)
                tokens.append(token.tolist()[0])
                finite = math.isfinite(row_max.tolist()[0])  # (the engine's check reads the row max too)
                done = tokens[-1] in eos or len(tokens) - num_prompt >= max_tokens or not finite
                t3 = time.perf_counter()
                if cached > num_prompt:  # decode steps only, as the engine's own step is mostly decodes
                    own += (t1 - t0) + (t3 - t2)
                    forward_s += t2 - t1
                    steps += 1
                if done:
                    break
            kv.free(seq_id)
    return {"own_of_small": own / forward_s, "own_us": 1e6 * own / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--policy", default="neural:0.7")
    args = parser.parse_args()
    torch.set_num_threads(default_threads())
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"), routers=pair_routers("demo"),
                          config=timed_config(chunk_threads=os.cpu_count() or 1))
    workload = demo_workload(engine.tokenizer, args.problems)
    print(f"{args.problems} problems, torch threads {torch.get_num_threads()}, chunk threads "
          f"{engine.config.chunk_threads}; warming up", flush=True)
    engine_run(engine, demo_workload(engine.tokenizer, 2), args.policy)
    reference = engine.generate([workload.request(i) for i in range(len(workload))], workload.sampling(), args.policy)
    replay = [{j for j, source in enumerate(r.provenance) if source == LARGE} for r in reference]
    share = sum(map(len, replay)) / sum(len(r.token_ids) for r in reference)
    rows: dict[str, list[float]] = {}
    for p in range(args.passes):
        runs = {name: engine_run(engine, workload, name) for name in ("small", "large", args.policy)}
        runs["replay"] = engine_run(engine, workload, args.policy, replay)
        if runs["replay"]["outputs"] != runs[args.policy]["outputs"]:
            raise SystemExit("the replayed decisions wrote other tokens than the router's: the replay is broken")
        floor = floor_run(engine, workload)
        small, large = runs["small"]["tokens_per_s"], runs["large"]["tokens_per_s"]
        bound = 1 / (large / small + share)  # in multiples of large's tokens/s
        values = {"small tok/s": small, "large tok/s": large, f"{args.policy} tok/s": runs[args.policy]["tokens_per_s"],
                  "replay tok/s": runs["replay"]["tokens_per_s"],
                  f"{args.policy} of bound": runs[args.policy]["tokens_per_s"] / large / bound,
                  "replay of bound": runs["replay"]["tokens_per_s"] / large / bound,
                  "small own / small fwd": runs["small"]["own_of_small"],
                  f"{args.policy} own / small fwd": runs[args.policy]["own_of_small"],
                  "replay own / small fwd": runs["replay"]["own_of_small"],
                  "floor own / small fwd": floor["own_of_small"],
                  "small own us": runs["small"]["own_us"], f"{args.policy} own us": runs[args.policy]["own_us"],
                  "replay own us": runs["replay"]["own_us"], "floor own us": floor["own_us"]}
        for kind, (us, share) in runs[args.policy]["by_kind"].items():  # own us a step of that kind; its share
            values[f"{args.policy} {kind} us"], values[f"{args.policy} {kind} share"] = us, share
        for name, value in values.items():
            rows.setdefault(name, []).append(value)
        print(f"pass {p + 1}/{args.passes}: " + ", ".join(f"{k} {v:.3f}" if v < 10 else f"{k} {v:.0f}"
                                                         for k, v in values.items()), flush=True)
    print(f"\nmedians over {args.passes} passes (large share {share:.4f}):")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"  {name:32} {median:.3f}" if median < 10 else f"  {name:32} {median:.1f}")


if __name__ == "__main__":
    main()
