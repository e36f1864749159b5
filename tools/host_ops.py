"""The per-step work done on the host (collab_decode/_hostops.c) against its torch ops, right after a forward, by
batch: the greedy sampler, the entropy routers' entropy, and the demo neural router's MLP over its features.

    .venv/bin/python tools/host_ops.py [--batches 1 2 4 8 16 32 64] [--steps 2000]

Each step runs the demo small model's decode forward over B sequences (what precedes the sampler and the router in
an engine step: its code and data are what their ops find in the caches), then times one call of the part measured
on those logits and hidden states, on the host and with the torch ops, in turn:
- sampler: `Sampler.sample`, greedy, with the top-1 probabilities a gated router reads and without;
- entropy: each row's entropy on the host (`row_entropies`, what the entropy routers decide from);
- router: the shipped router's MLP logits (`NeuralRoute._mlp_logits`: its top logits, prompt lookup, embedding
  row and MLP) at every row.
Prints the median microseconds of each by B: where the host stops paying is HOST_GREEDY_MAX_ROWS
(collab_decode/sampling.py), HOST_ENTROPY_MAX_ROWS (collab_decode/routing/policies.py) and HOST_MAX_ROWS
(collab_decode/routing/neural.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from collab_decode import sampling
from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.demo import checkpoint_dir
from collab_decode.bench.measure import timed_config
from collab_decode.engine.loading import build_engine
from collab_decode.pairs import pair_routers
from collab_decode.routing import RouterInputs, neural, parse_routing, policies
from collab_decode.serve.cli import default_threads

PROMPT_LEN = 40
KINDS = ("sampler", "sampler+top1", "entropy", "router")


def measure(kind: str, on_host: bool, out, router, sampler, contexts: list, greedy) -> float:
    """Seconds of one call of `kind` on this forward's output, on the host or with the torch ops."""
    batch = len(contexts)
    sampling._hostops = HOST if on_host else None
    neural.HOST_MAX_ROWS = 1 << 20 if on_host else 0
    policies.HOST_ENTROPY_MAX_ROWS = 1 << 20 if on_host else 0
    try:
        if kind == "entropy":
            t0 = time.perf_counter()
            policies.row_entropies(out.logits)
        elif kind == "router":
            ids = out.logits.argmax(-1)
            inputs = RouterInputs([c.state for c in contexts], out.logits, out.hidden, ids, router.embed,
                                  contexts=contexts, top1=[0.5] * batch, proposed_ids=ids.tolist(),
                                  embedding=router.embedding)
            t0 = time.perf_counter()
            router.route._mlp_logits(inputs, list(range(batch)))
        else:
            t0 = time.perf_counter()
            sampler.sample(out.logits, [greedy] * batch, [None] * batch, kind == "sampler+top1")
        return time.perf_counter() - t0
    finally:
        sampling._hostops, neural.HOST_MAX_ROWS, policies.HOST_ENTROPY_MAX_ROWS = HOST, HOST_MAX_ROWS, ENTROPY_MAX_ROWS


HOST, HOST_MAX_ROWS, ENTROPY_MAX_ROWS = sampling._hostops, neural.HOST_MAX_ROWS, policies.HOST_ENTROPY_MAX_ROWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    if HOST is None:
        raise SystemExit("collab_decode._hostops is not built here (make setup builds it)")
    torch.set_num_threads(default_threads())
    engine = build_engine(checkpoint_dir("small"), routers=pair_routers("demo"), config=timed_config())
    backend, kv, sampler = engine.backends["small"], engine.kv["small"], sampling.Sampler()
    router = SimpleNamespace(route=engine.router_for(parse_routing("neural:0.7")), embed=backend.embed,
                             embedding=backend.embedding)
    greedy = sampling.SamplingParams(temperature=0)
    print(f"torch threads {torch.get_num_threads()}; us per call after a forward (median of "
          f"{args.steps // (2 * len(KINDS))} "
          f"each)\n{'B':>4} " + " ".join(f"{k + ' ' + w:>18}" for k in KINDS for w in ("host", "torch")))
    with torch.inference_mode():
        for batch in args.batches:
            ids = list(range(-batch, 0))  # ids the engine never gives
            prompt = list(range(5, 5 + PROMPT_LEN))
            contexts = [SimpleNamespace(prompt_ids=prompt, token_ids=list(prompt), state=router.route.new_state())
                        for _ in ids]
            tables = []
            for seq_id in ids:
                kv.allocate(seq_id, PROMPT_LEN + args.steps)
                tables.append(kv.block_table(seq_id))
            backend.forward(ModelInput([SeqChunk(s, prompt, 0, t) for s, t in zip(ids, tables)]))
            times: dict[tuple[str, bool], list[float]] = {}
            for step in range(args.steps):
                kind, on_host = KINDS[step % len(KINDS)], step % (2 * len(KINDS)) < len(KINDS)
                token = 5 + step % 100
                out = backend.forward(ModelInput([SeqChunk(s, [token], PROMPT_LEN + step, t)
                                                  for s, t in zip(ids, tables)]))
                for c in contexts:
                    c.token_ids.append(token)
                times.setdefault((kind, on_host), []).append(measure(kind, on_host, out, router, sampler, contexts,
                                                                     greedy))
            for seq_id in ids:
                kv.free(seq_id)
            us = {key: 1e6 * statistics.median(v) for key, v in times.items()}
            print(f"{batch:>4} " + " ".join(f"{us[k, h]:>18.1f}" for k in KINDS for h in (True, False)), flush=True)


if __name__ == "__main__":
    main()
