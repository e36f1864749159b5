"""Greedy outputs of every policy on 50 held-out demo problems (token ids and provenance), as JSON: run it on
two revisions and compare the files to show a refactor changed no output.

    PYTHONPATH=TREE .venv/bin/python tools/golden_outputs.py OUT.json [POLICY ...]    (e.g. neural:demo:0.95)
"""

import json
import sys

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.loading import build_engine
from collab_decode.pairs import pair_routers
from collab_decode.sampling import SamplingParams

POLICIES = ["small", "large", "random:0.2", "entropy:0.3", "entropy:1.0", "confidence:0.8", "step-entropy:0.6",
            "speculative:3"]

engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"), config=EngineConfig(),
                      routers=pair_routers("demo"))  # the shipped router: neural:demo:T policies
prompts = [chat_prompt(p.question) for p in problems("heldout", 50)]
out = {}
for policy in sys.argv[2:] or POLICIES:
    results = engine.generate(prompts, SamplingParams(max_tokens=200, temperature=0.0, seed=7), policy)
    out[policy] = [[r.token_ids, r.provenance] for r in results]
    share = sum(r.stats["large_tokens"] for r in results) / sum(len(r.token_ids) for r in results)
    print(f"{policy}: large share {share:.3f}", flush=True)
json.dump(out, open(sys.argv[1], "w"))
