"""Routing in a token step: each distinct router asked once, batched, about the positions the small model just
proposed; a router that raises fails only the requests it raises on.

    asks_router(seqs, top1_probs) -> whether any row's router must be asked at all (a gated router's sure rows
                                     and `small` need none: the step commits the small model's tokens at once)
    route(proposals, view, times) -> the sequences whose token the large model writes this step
      decide(router, inputs, rows)   one batched call (each row alone if the batch raises)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from collab_decode.engine.output import Proposal, internal_error
from collab_decode.engine.runner import StepTimes
from collab_decode.engine.sequence import LARGE, SMALL, Sequence
from collab_decode.routing import Router, RouterInputs

log = logging.getLogger(__name__)


@dataclass
class SmallView:
    """The sequences that reached their last token in this step's small forward, and what the small model
    saw there (row i of `inputs` = seqs[i])."""

    seqs: list[Sequence]
    inputs: RouterInputs


def route(proposals: dict[int, Proposal], view: SmallView | None, times: StepTimes) -> list[Sequence]:
    """Ask each distinct router about the sequences that need its decision, in one batched call;
    mark routed proposals. Step-mode sequences are asked only at a step's start, and the answer
    owns the step. A sequence the router raises on fails (its proposal carries the error)."""
    groups: dict[int, list[int]] = {}  # id(router) -> rows of the view
    seqs = view.seqs if view is not None else []
    for i, seq in enumerate(seqs):
        if (seq.uses_large and (seq.mode == "token" or seq.step_owner is None)
                and proposals[seq.seq_id].error is None):
            groups.setdefault(id(seq.router), []).append(i)
    if groups:  # (timed only where a router is asked: `small` and `large` spend nothing here)
        t0 = time.perf_counter()
        for rows in groups.values():
            for i, routed in decide(seqs[rows[0]].router, view.inputs, rows).items():
                seq = seqs[i]
                if routed is None:
                    proposals[seq.seq_id].error = internal_error("routing", seq.seq_id)
                    continue
                proposals[seq.seq_id].routed = routed
                if seq.mode == "step":
                    seq.step_owner = LARGE if routed else SMALL
        times.route += time.perf_counter() - t0
    return [p.seq for p in proposals.values() if p.routed and p.error is None]


def decide(router: Router, inputs: RouterInputs, rows: list[int]) -> dict[int, bool | None]:
    """Row of `inputs` -> the router's decision, from one batched call (usually one router: every row).
    If that call raises, each row is asked alone: the rows it still raises on get None (their requests
    fail), the others the decision they get alone."""
    try:
        batch = inputs if len(rows) == len(inputs.states) else inputs.select(rows)
        return dict(zip(rows, _as_list(router.decide(batch))))
    except Exception:
        log.exception("router %s raised on a batch of %d sequences; asking each alone", type(router).__name__,
                      len(rows))
    decisions: dict[int, bool | None] = {}
    for i in rows:
        try:
            decisions[i] = _as_list(router.decide(inputs.select([i])))[0]
        except Exception:
            log.exception("router %s raised on one sequence: that request fails", type(router).__name__)
            decisions[i] = None
    return decisions


def _as_list(decisions) -> list[bool]:
    """A router's decisions (a bool tensor, or a list of bools) as a list."""
    return decisions.tolist() if isinstance(decisions, torch.Tensor) else list(decisions)


def asks_router(seqs: list[Sequence], top1_probs: list[float] | None) -> bool:
    """Some row's router must be asked about its token (none under `small`; none where every row is sure)."""
    return any(s.uses_large for s in seqs) and not _all_sure(seqs, top1_probs)


def _all_sure(seqs: list[Sequence], top1_probs: list[float] | None) -> bool:
    """Every row's top-1 probability (the sampler's) reaches its sequence's gate, where its router routes nothing,
    or its sequence never uses the large model (`small` in a mixed batch): the step needs no routing call (at
    batch 1, most steps of a gated router; NaN reaches nothing)."""
    return top1_probs is not None and all(p >= s.gate if s.gate is not None else not s.uses_large
                                          for s, p in zip(seqs, top1_probs))
