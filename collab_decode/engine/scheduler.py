"""The scheduler: which sequences run this step, and how many of their tokens. It counts; it does not compute.

Each step: admit waiting sequences (oldest first) while the batch has room and both models' pools
could take the prompt; give every scheduled sequence the small-model blocks its chunk needs,
preempting the youngest running sequence (free its blocks, requeue it for recompute) when the pool
runs dry. The large model's blocks are claimed only when a sequence is routed to it (`reserve`).
Long prompts are prefilled in chunks under a per-step token budget, so they never stall decodes.
The usual step, every running sequence decoding one token in blocks it holds and nothing waiting, is
recognised first (`decodes`) and planned without that bookkeeping (`ScheduleOutput.decodes_only`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from collab_decode.engine.sequence import LARGE, SMALL, Sequence, Status
from collab_decode.kvcache import KVCacheManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "most small-model tokens per engine step (longer prompts are prefilled in chunks; drafts on top)"})
    max_model_len: int = field(default=2048, metadata={
        "help": "most tokens (prompt + output) of one sequence (capped by what the models were built for)"})

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduleOutput:
    """The plan for one step."""

    seqs: list[Sequence]  # scheduled sequences, oldest first
    num_new_tokens: list[int]  # small-model chunk length per scheduled sequence (0: large model only)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this step
    # every running sequence decodes its one new token in blocks it holds, none drafts (speculative) or has a
    # prompt left to score, none was admitted or preempted: the usual step (Scheduler.decodes)
    decodes_only: bool = False

    def sampled(self) -> list[bool]:
        """Whether each scheduled sequence reaches its last token (so gets a next token) this step."""
        return [n == 0 or s.num_cached[SMALL] + n == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens)]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: dict[str, KVCacheManager],
                 on_release: Callable[[int], None] | None = None):
        self.config = config
        self.kv = kv  # SMALL (and LARGE, for a pair) -> block bookkeeping
        # called with a sequence id whenever its blocks are freed (finished, aborted or preempted), so
        # backends that keep per-sequence state of their own can drop it
        self.on_release = on_release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens fits every pool when it runs alone."""
        return all(m.pool.num_blocks * m.block_size >= num_tokens for m in self.kv.values())

    def schedule(self) -> ScheduleOutput:
        decoding = self.decodes()
        if decoding is not None:  # the usual step: the plan the general rule would make, without its bookkeeping
            return ScheduleOutput(decoding, [1] * len(decoding), decodes_only=True)
        return self._schedule_general()

    def _schedule_general(self) -> ScheduleOutput:
        """Running sequences first (oldest first), each its backlog within the token budget and given its blocks,
        then waiting ones admitted while the batch and both pools have room."""
        budget = self.config.max_num_batched_tokens
        out = ScheduleOutput(seqs=[], num_new_tokens=[])
        for seq in list(self.running):  # oldest first
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop (back to waiting)
            budget = self._schedule_one(seq, budget, out)
        computing: set[tuple[int, ...]] = set()  # the first uncached block of each sequence admitted (its prefix)
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not all(self._can_admit(seq, m) for m in self._pools_of(seq)):
                break  # admission checks every pool the request will use; keep arrival order
            block = self._first_uncached_block(seq)
            if block is not None:
                if block in computing:
                    break  # a sequence admitted now computes that block: it waits a step and finds it cached
                computing.add(block)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.queue_time_s is None:  # its first admission (a preempted request's next is not queueing)
                seq.queue_time_s = (time.monotonic_ns() - seq.arrival) / 1e9
            self.running.append(seq)
            for model in self._pools_of(seq):
                if self._matched_at_admission(seq, model):
                    self._match_prefix(seq, model)
            budget = self._schedule_one(seq, budget, out)
        return out

    @staticmethod
    def _matched_at_admission(seq: Sequence, model: str) -> bool:
        """Whether a model's cache of a sequence starts from the prefix cache at admission: the small model's, and
        the large model's where it runs from the first token (`large`, speculative); others' at `reserve`."""
        return model == SMALL or seq.mode == "speculative" or seq.routes_all

    @staticmethod
    def _reads_cache(seq: Sequence, model: str) -> bool:
        """Whether `model` may start a sequence from the prefix cache: not the model scoring its prompt
        (prompt_logprobs), which needs its logits at every prompt position."""
        return not (seq.needs_prompt_logprobs and model == seq.prompt_scorer)

    def _can_admit(self, seq: Sequence, model: str) -> bool:
        """Whether `model`'s pool has room for the sequence's tokens and its next one (the cached blocks it will
        find count for it, where it finds them at admission)."""
        kv = self.kv[model]
        if self._matched_at_admission(seq, model) and self._reads_cache(seq, model):
            return kv.can_admit(seq.seq_id, seq.token_ids, seq.num_tokens + 1)
        return kv.can_allocate(seq.seq_id, seq.num_tokens + 1)

    def _first_uncached_block(self, seq: Sequence) -> tuple[int, ...] | None:
        """(Prefix caching.) A waiting sequence's tokens up to the end of the first block of its small-model cache
        not in the prefix cache, which its prefill computes first; None if no such whole block. Requests sharing a
        prompt that arrive together (a system prompt; n choices of one prompt) thus prefill it once: the first is
        admitted, the others a step later, when they find it cached."""
        kv = self.kv[SMALL]
        if not kv.prefix_caching or not seq.uses_small or seq.needs_prompt_logprobs:
            return None
        end = (len(kv.cached_blocks(seq.token_ids, seq.num_tokens - 1)) + 1) * kv.block_size
        return tuple(seq.token_ids[:end]) if end <= seq.num_tokens - 1 else None

    def _match_prefix(self, seq: Sequence, model: str) -> None:
        """Start `model`'s cache of a sequence that holds none of its blocks from the cached blocks its tokens begin
        with (prefix caching; at least its last token is computed, for its next token's logits): the small model's
        at admission, the large model's when it first runs on the sequence (a token-level sequence's first routed
        token; a `large` or speculative one's admission, whose token_ids hold no draft then). Not the model that
        scores the prompt (prompt_logprobs): every prompt position needs that model's logits."""
        if not self._reads_cache(seq, model):
            return
        seq.num_cached[model] = self.kv[model].match(seq.seq_id, seq.token_ids, seq.num_tokens - 1)
        if seq.stats.num_preemptions == 0 and model == (SMALL if seq.uses_small else LARGE):
            seq.stats.num_cached_tokens = seq.num_cached[model]  # the prompt's, as first read (usage)

    def decodes(self) -> list[Sequence] | None:
        """The running sequences, oldest first, if this step's plan is each of them decoding one token in blocks
        it holds with nothing waiting (what the general rule below would plan: no block to give, nobody to
        admit or preempt), and none drafts (a speculative sequence's step is the engine's draft and verify) or
        has a prompt left to score; else None."""
        running, small = self.running, self.kv[SMALL]
        if self.waiting or not running or len(running) > self.config.max_num_batched_tokens:
            return None
        for seq in running:
            num_tokens = len(seq.token_ids)
            if (num_tokens - seq.num_cached[SMALL] != 1 or seq.large_owned or seq.mode == "speculative"
                    or seq.needs_prompt_logprobs or not small.holds(seq.seq_id, num_tokens)):
                return None
        return list(running)

    def _pools_of(self, seq: Sequence) -> list[str]:
        pools = [SMALL] if seq.uses_small else []
        return pools + ([LARGE] if seq.uses_large and LARGE in self.kv else [])

    def _schedule_one(self, seq: Sequence, budget: int, out: ScheduleOutput) -> int:
        if budget <= 0:
            return budget
        if seq.large_owned:  # the large model writes this token; the small model lags
            out.seqs.append(seq)
            out.num_new_tokens.append(0)
            return budget - 1
        num_new = min(seq.num_tokens - seq.num_cached[SMALL], budget)  # its backlog, within the budget
        target = seq.num_cached[SMALL] + num_new
        if not self.kv[SMALL].holds(seq.seq_id, target):  # (the usual decode step: its last block has room)
            if not self._make_room(SMALL, seq, target, out):
                return budget  # it was the youngest: preempted itself
            self.kv[SMALL].allocate(seq.seq_id, target)
        out.seqs.append(seq)
        out.num_new_tokens.append(num_new)
        return budget - num_new

    def reserve(self, model: str, seqs: list[Sequence], num_tokens: list[int]) -> list[Sequence]:
        """Give each seq blocks in `model`'s pool for num_tokens tokens, preempting the youngest as
        needed. Returns the sequences that were preempted (possibly some of `seqs`)."""
        preempted: list[Sequence] = []
        for seq, n in zip(seqs, num_tokens):
            if (seq.status is Status.RUNNING and not self.kv[model].has(seq.seq_id)
                    and not self._matched_at_admission(seq, model)):
                self._match_prefix(seq, model)  # its first large call since admission
            if seq.status is Status.RUNNING and self._make_room(model, seq, n, None, preempted):
                self.kv[model].allocate(seq.seq_id, n)
        return preempted

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def truncate(self, seq: Sequence, model: str, num_tokens: int) -> None:
        """Roll `model`'s cache of seq back to its first num_tokens tokens and free surplus blocks."""
        num_cached = min(seq.num_cached[model], num_tokens)
        if self.kv[model].has(seq.seq_id):
            self.kv[model].truncate(seq.seq_id, num_cached)
        seq.num_cached[model] = num_cached

    def _make_room(self, model: str, seq: Sequence, num_tokens: int, out: ScheduleOutput | None,
                   preempted: list[Sequence] | None = None) -> bool:
        """Preempt until `model`'s pool can give seq room for num_tokens. The victim is the youngest of
        seq and the running sequences holding blocks in that pool (freeing others would not help).
        False if seq itself was the youngest and is now preempted."""
        manager = self.kv[model]
        while not manager.can_allocate(seq.seq_id, num_tokens):
            # (a sequence whose blocks others share too would free none: prefix caching)
            holders = [s for s in self.running if s is not seq and manager.frees_blocks(s.seq_id)]
            victim = max(holders + [seq], key=lambda s: s.arrival)
            self._preempt(victim, out)
            if preempted is not None:
                preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _free(self, seq: Sequence) -> None:
        for manager in self.kv.values():
            manager.free(seq.seq_id)
        if self.on_release is not None:
            self.on_release(seq.seq_id)

    def _preempt(self, seq: Sequence, out: ScheduleOutput | None) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        if out is not None:
            if seq in out.seqs:
                i = out.seqs.index(seq)
                del out.seqs[i], out.num_new_tokens[i]
            out.preempted.append(seq)


__all__ = ["Scheduler", "SchedulerConfig", "ScheduleOutput", "SMALL", "LARGE"]
