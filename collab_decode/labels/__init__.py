"""Routing labels (DESIGN.md, "Labels"): where the small model would leave the large model's reasoning, and
whether it matters. `collab-decode label` runs it; the router trainer reads its dataset.

    queries.jsonl --read_queries--> [Query]
      0 traces.make_traces            the large model's greedy answer per query (engine, batched)    [Trace]
      1 forcing.teacher_force         the small model reads each trace: features at every position   ForcedRows
      2 continuations                 each mismatch + the small model's token, continued by the large [Branch]
      3 verifiers / judge             neutral | divergent | unparsed | skipped per mismatch           [Verdict]
      4 dataset.shard_tables          shards/K.safetensors + K.queries.jsonl + K.mismatches.jsonl, stats.json
    pipeline.LabelRun runs the stages over shards, resumably; dataset.read_dataset reads the result back.
"""
