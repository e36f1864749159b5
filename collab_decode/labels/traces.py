"""Stage 0, the reference traces: the large model answers each query greedily through the engine (all of a
shard's queries added at once, so the engine batches them), or the query file gives the response.

    queries -> prompt ids (the server's tokenization) -> decode_greedy(engine, "large") -> [Trace]

`decode_greedy` is also how stage 2 continues branches.
"""

from __future__ import annotations

from dataclasses import dataclass

from collab_decode.labels.progress import Progress
from collab_decode.labels.queries import Query, QueryError, query_prompt_ids
from collab_decode.sampling import SamplingParams

GIVEN = "given"  # finish reason of a trace the query file carried


@dataclass
class Trace:
    query_index: int  # the query's index in the query file
    prompt_ids: list[int]  # the query rendered and tokenized
    response_ids: list[int]  # the reference trace (the large model's greedy answer, EOS included if it stopped)
    finish_reason: str  # "stop" | "length" (the large model's), or "given"


@dataclass
class Decoded:
    token_ids: list[int]  # what the large model wrote (past a stop string too: the caller cuts text)
    finish_reason: str  # "stop" | "length"


def decode_greedy(engine, prompts: list[list[int]], max_tokens: list[int], stop: tuple[str, ...] = (),
                  progress: Progress | None = None) -> list[Decoded]:
    """The large model continues every prompt greedily; results in prompt order. The engine batches the
    requests (up to its max_num_seqs at a time). A prompt with max_tokens 0 gets an empty result."""
    results: list[Decoded | None] = [Decoded([], "length") if m < 1 else None for m in max_tokens]
    index = {}  # engine seq id -> prompt index
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        if m >= 1:
            sampling = SamplingParams(max_tokens=m, temperature=0.0, stop=stop)
            index[engine.add_request(prompt, sampling, "large", stream_text=False)] = i
    num_left = len(index)
    while num_left:
        for out in engine.step():
            if progress is not None:
                progress.add(num_tokens=len(out.new_token_ids))
            if not out.finished or out.seq_id not in index:
                continue
            if out.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"the engine ended a request with {out.finish_reason!r}: "
                                   f"{getattr(out.seq, 'error', None) or 'no reason given'}")
            results[index[out.seq_id]] = Decoded(list(out.seq.output_ids), out.finish_reason)
            num_left -= 1
            if progress is not None:
                progress.add(num_items=1)
    return results


def make_traces(engine, queries: list[Query], max_tokens: int, progress: Progress | None = None) -> list[Trace]:
    """A reference trace per query, in query order."""
    tok = engine.tokenizer
    prompts = [query_prompt_ids(tok, q) for q in queries]
    for q, prompt in zip(queries, prompts):
        if not prompt:
            raise QueryError(f"query {q.id!r}: the prompt tokenizes to no tokens")
        if len(prompt) >= engine.max_model_len:
            raise QueryError(f"query {q.id!r}: its prompt has {len(prompt)} tokens, the pair's context "
                             f"holds {engine.max_model_len}: no room for a response")
    todo = [i for i, q in enumerate(queries) if q.response is None]
    budgets = [min(max_tokens, engine.max_model_len - len(prompts[i])) for i in todo]
    decoded = dict(zip(todo, decode_greedy(engine, [prompts[i] for i in todo], budgets, progress=progress)))
    traces = []
    for i, q in enumerate(queries):
        if q.response is not None:
            response = tok(q.response, add_special_tokens=False)["input_ids"]
            if len(prompts[i]) + len(response) > engine.max_model_len:
                raise QueryError(f"query {q.id!r}: prompt + response are {len(prompts[i]) + len(response)} "
                                 f"tokens, more than the pair's context ({engine.max_model_len})")
            traces.append(Trace(q.index, prompts[i], response, GIVEN))
            if progress is not None:
                progress.add(num_items=1)
        else:
            traces.append(Trace(q.index, prompts[i], decoded[i].token_ids, decoded[i].finish_reason))
    return traces
