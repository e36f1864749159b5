"""Stage 2, continuations: from each mismatch, the prefix + the small model's token, continued greedily by the
large model through the engine (all of a shard's branches added at once, so the engine batches them).

    traces + ForcedRows -> find_branches (every mismatch, in row order) -> continue_branches -> [Branch]

How far a branch runs is the verifier's call (`Verifier.budget` / `Verifier.stop`): to the end for `answer`,
to the step's end or N tokens for `judge` and `exact`. A mismatch the verifier cannot label (say, its
reference trace got the answer wrong) is not continued: its finish reason is "skipped". A branch whose
small-model token is an end-of-sequence token has nothing to continue ("stop", no tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collab_decode.labels.forcing import ForcedRows
from collab_decode.labels.progress import Progress
from collab_decode.labels.traces import Trace, decode_greedy

SKIPPED = "skipped"


@dataclass
class Branch:
    query_index: int
    position: int  # the mismatch's index in the response
    reference_token: int  # the trace's token there
    small_token: int  # the small model's top-1 there: the branch's first token
    continuation_ids: list[int] = field(default_factory=list)  # the large model's greedy tokens after it
    finish_reason: str = ""  # "stop" | "length" | "skipped" (not continued: the verifier cannot label it)

    def prompt_ids(self, trace: Trace) -> list[int]:
        """What the large model continues: prompt + response before the mismatch + the small model's token."""
        return trace.prompt_ids + trace.response_ids[:self.position] + [self.small_token]


def find_branches(rows: ForcedRows) -> list[Branch]:
    """One branch per mismatch position, in row order (queries in order, positions in order)."""
    idx = rows.mismatch.nonzero().flatten().tolist()
    return [Branch(int(rows.query_index[i]), int(rows.position[i]), int(rows.token_id[i]), int(rows.small_top1[i]))
            for i in idx]


def continue_branches(engine, traces: dict[int, Trace], branches: list[Branch], verifier,
                      progress: Progress | None = None) -> list[Branch]:
    """Fill in each branch's continuation (in place; also returned). `traces` by query index."""
    todo = []
    for b in branches:
        trace = traces[b.query_index]
        if not verifier.can_label(trace):
            b.finish_reason = SKIPPED
        elif b.small_token in engine.eos_token_ids:
            b.finish_reason = "stop"  # the branch ends with its first token
        else:
            todo.append(b)
    prompts = [b.prompt_ids(traces[b.query_index]) for b in todo]
    budgets = [min(verifier.budget(b), engine.max_model_len - len(p)) for b, p in zip(todo, prompts)]
    # the longest budgets first (stable), so the batch's tail is short branches, not a few long ones
    order = sorted(range(len(todo)), key=lambda i: -budgets[i])
    if progress is not None:
        progress.add(num_items=len(branches) - len(todo))
    outs = decode_greedy(engine, [prompts[i] for i in order], [budgets[i] for i in order], verifier.stop, progress)
    for i, out in zip(order, outs):
        todo[i].continuation_ids, todo[i].finish_reason = out.token_ids, out.finish_reason
    return branches
