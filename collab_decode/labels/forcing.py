"""Stage 1, teacher forcing: the small model reads each trace (prompt + response) and, at every response
position, we keep what the online router would see there if the small model were decoding this trace.

    traces -> chunks of up to `max_tokens_per_forward` tokens, many traces per forward, through the small
    backend over the engine's paged cache (private negative seq ids; every block freed after)
    -> at each response position: logits, last hidden state, the small model's top-1 (its greedy proposal)
    -> router_features(hidden, embed(top-1), logits, top_k): THE feature function of the online router
    -> lookup_features(the prompt's n-grams, the context, the small model's top tokens): its prompt lookup
    -> ForcedRows: one row per response position, traces in order, positions in order

A position is a *mismatch* where the small model's top-1 differs from the trace's token. Long traces are
forwarded in chunks (the cache holds what came before), so a forward's logits never exceed the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.labels.progress import Progress
from collab_decode.labels.traces import Trace
from collab_decode.routing import entropy
from collab_decode.routing.features import (LOOKUP_MAX_N, LOOKUP_SIZE, LOOKUP_TOP, PromptIndex, lookup_features,
                                           router_features, top_tokens)

SMALL = "small"
INT_COLUMNS = ("query_index", "position", "token_id", "small_top1")
FLOAT_COLUMNS = ("entropy", "top1_prob", "top2_margin")


@dataclass
class ForcedRows:
    """Stage 1's result: row i = one response position."""

    features: torch.Tensor  # (N, 2H + top_k) float32: [hidden, embedding of small_top1, sorted top-k logits]
    lookup: torch.Tensor  # (N, LOOKUP_SIZE) float32: lookup_features (routers trained with --prompt-lookup)
    query_index: torch.Tensor  # (N,) int32: the query the position belongs to
    position: torch.Tensor  # (N,) int32: index in the response (0 = the first response token)
    token_id: torch.Tensor  # (N,) int32: the trace's token at that position
    small_top1: torch.Tensor  # (N,) int32: the small model's greedy choice there (what it would propose)
    entropy: torch.Tensor  # (N,) float32: entropy (nats) of the small model's distribution (a baseline signal)
    top1_prob: torch.Tensor  # (N,) float32: probability of its top-1 (a baseline signal)
    top2_margin: torch.Tensor  # (N,) float32: top-1 minus top-2 probability (a baseline signal)

    @property
    def mismatch(self) -> torch.Tensor:
        return self.small_top1 != self.token_id

    def columns(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("features", "lookup") + INT_COLUMNS + FLOAT_COLUMNS}

    @classmethod
    def from_columns(cls, tensors: dict[str, torch.Tensor]) -> "ForcedRows":
        return cls(**{name: tensors[name] for name in ("features", "lookup") + INT_COLUMNS + FLOAT_COLUMNS})


@dataclass
class _Job:
    """One trace being forced: the tokens the small model reads and how far its cache has got."""

    seq_id: int
    trace: Trace
    tokens: list[int]  # prompt + response[:-1]: the inputs whose next-token logits we need
    first: int  # the input position predicting response token 0 (= len(prompt) - 1)
    index: PromptIndex  # the prompt's n-grams (the lookup features)
    num_cached: int = 0
    parts: list[dict[str, torch.Tensor]] = field(default_factory=list)


def teacher_force(engine, traces: list[Trace], top_k: int, max_tokens_per_forward: int,
                  progress: Progress | None = None) -> ForcedRows:
    """Router features and the small model's top-1 at every response position of every trace."""
    vocab = engine.vocab_size
    if top_k > vocab:
        raise ValueError(f"top_k ({top_k}) exceeds the vocabulary ({vocab})")
    kv = engine.kv[SMALL]
    jobs = [_Job(-1 - i, t, t.prompt_ids + t.response_ids[:-1], len(t.prompt_ids) - 1, PromptIndex(t.prompt_ids))
            for i, t in enumerate(traces) if t.response_ids]
    pending = deque(jobs)
    try:
        while pending:
            chunks = _plan(pending, kv, max_tokens_per_forward)
            _forward(engine, chunks, top_k)
            for job, n in chunks:
                job.num_cached += n
            while pending and pending[0].num_cached == len(pending[0].tokens):
                kv.free(pending.popleft().seq_id)
                if progress is not None:
                    progress.add(num_items=1)
            if progress is not None:
                progress.add(num_tokens=sum(n for _, n in chunks))
    finally:
        for job in jobs:
            kv.free(job.seq_id)
    return _concat([part for job in jobs for part in job.parts], engine.backends[SMALL].hidden_size, top_k)


def _plan(pending: deque[_Job], kv, budget: int) -> list[tuple[_Job, int]]:
    """The next forward: jobs in order (the first may be half done), as many tokens as the budget and the
    small model's KV pool allow; each job's blocks are allocated here."""
    chunks = []
    for job in pending:
        n = min(len(job.tokens) - job.num_cached, budget)
        if n <= 0 or not kv.can_allocate(job.seq_id, job.num_cached + n):
            break
        kv.allocate(job.seq_id, job.num_cached + n)
        chunks.append((job, n))
        budget -= n
    if not chunks:
        raise ValueError("the small model's KV cache cannot hold one teacher-forcing chunk: grant it more "
                         "memory (--kv-memory) or lower --forced-tokens")
    return chunks


def _forward(engine, chunks: list[tuple[_Job, int]], top_k: int) -> None:
    """One small-model forward over the chunks; each job keeps its rows (the response positions)."""
    small = engine.backends[SMALL]
    batch = ModelInput([SeqChunk(job.seq_id, job.tokens[job.num_cached:job.num_cached + n], job.num_cached,
                                 engine.kv[SMALL].block_table(job.seq_id), all_positions=True)
                        for job, n in chunks])
    out = small.forward(batch)
    hidden, logits, owners = [], [], []
    for job, n in chunks:
        lo = max(job.first - job.num_cached, 0)  # prompt positions before `first` predict prompt tokens
        if lo >= n:
            continue
        hidden.append(out.all_hidden[job.seq_id][lo:n])
        logits.append(out.all_logits[job.seq_id][lo:n, :engine.vocab_size])
        owners.append((job, job.num_cached + lo - job.first, n - lo))
    if not owners:
        return
    logits = torch.cat(logits)
    top = torch.topk(logits.float(), max(top_k, LOOKUP_TOP), dim=-1)  # the features' and the lookup's, as online
    rows = {name: t.cpu() for name, t in _rows(torch.cat(hidden), logits, small.embed, top_k, top.values).items()}
    top_ids, top_probs = top_tokens(top.values, top.indices, rows["top1_prob"].tolist())
    start = 0
    for job, first_position, count in owners:
        positions = torch.arange(first_position, first_position + count, dtype=torch.int32)
        response = torch.tensor(job.trace.response_ids, dtype=torch.int32)
        part = {name: t[start:start + count] for name, t in rows.items()}
        # the context of response position p is prompt + response[:p]: job.tokens up to input first + p
        ends = range(job.first + first_position + 1, job.first + first_position + count + 1)
        lookup = [lookup_features(job.index, job.tokens[max(0, end - LOOKUP_MAX_N):end], top_ids[start + r],
                                  top_probs[start + r]) for r, end in enumerate(ends)]
        part.update(query_index=torch.full((count,), job.trace.query_index, dtype=torch.int32),
                    position=positions, token_id=response[positions.long()],
                    lookup=torch.tensor(lookup, dtype=torch.float32).reshape(-1, LOOKUP_SIZE))
        job.parts.append(part)
        start += count


def _rows(hidden: torch.Tensor, logits: torch.Tensor, embed, top_k: int, top_values: torch.Tensor
          ) -> dict[str, torch.Tensor]:
    """(T, H) hidden and (T, V) logits (and their largest, sorted) -> features and signals per position, as the
    online router computes."""
    top1 = logits.argmax(-1)  # (T,) the greedy proposal (the sampler's argmax)
    features = router_features(hidden, embed(top1), logits, top_k, top_values=top_values)
    probs = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values  # (T, 2)
    return {"features": features, "small_top1": top1.to(torch.int32), "entropy": entropy(logits),
            "top1_prob": probs[:, 0], "top2_margin": probs[:, 0] - probs[:, 1]}


def _concat(parts: list[dict[str, torch.Tensor]], hidden_size: int, top_k: int) -> ForcedRows:
    if not parts:
        empty = {name: torch.zeros(0, dtype=torch.int32) for name in INT_COLUMNS}
        empty.update({name: torch.zeros(0) for name in FLOAT_COLUMNS})
        return ForcedRows(features=torch.zeros(0, 2 * hidden_size + top_k), lookup=torch.zeros(0, LOOKUP_SIZE),
                          **empty)
    return ForcedRows(**{name: torch.cat([p[name] for p in parts]) for name in parts[0]})
