"""The large model's half of a token step: it catches up on each routed sequence's backlog and writes its
token, in one forward that also prefills the prompts it scores; at a large batch, routed tokens may wait a few
steps to share that forward (--large-wait-steps).

    LargeStep.run(routed, proposals, step) -> outputs of the requests it failed
      hold       which routed tokens run now, which wait
      reserve    large-model blocks (the scheduler preempts the youngest as needed)
      forward    each sequence's backlog from its num_cached[LARGE] (the catch-up rule)
      sample     the routed rows' tokens replace the small model's proposals
"""

from __future__ import annotations

from collab_decode.backends.base import BackendError
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.output import OutputProcessor, Proposal, RequestOutput, nonfinite_error, upstream_error
from collab_decode.engine.runner import ModelRunner
from collab_decode.engine.scheduler import Scheduler
from collab_decode.engine.sequence import LARGE, Sequence


class LargeStep:
    """The engine's large-model half of a step, over the engine's own runner, scheduler, output and config."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, output: OutputProcessor, config: EngineConfig):
        self.runner, self.scheduler, self.output, self.config = runner, scheduler, output, config

    def run(self, routed: list[Sequence], proposals: dict[int, Proposal], step: int) -> list[RequestOutput]:
        """The large model catches up on each routed sequence's backlog and writes its next token. Returns
        the outputs of requests it failed: those a BackendError names end with an error; the rest of the
        batch commit nothing this step, and next step (their small backlog empty) go to the large model
        again without a new routing decision.
        The same forward prefills the prompts the large model scores (prompt_logprobs) of sequences whose
        token the small model writes: their rows are not sampled."""
        scoring = [p.seq for p in proposals.values() if not p.routed and p.sample is not None
                   and p.seq.needs_prompt_logprobs and p.seq.prompt_scorer == LARGE]
        routed = self.hold(routed, proposals, bool(scoring), step)
        if not routed and not scoring:
            return []
        for seq in self.scheduler.reserve(LARGE, routed + scoring, [s.num_tokens for s in routed + scoring]):
            proposals.pop(seq.seq_id, None)  # preempted: it will recompute from scratch
        routed = [s for s in routed if s.seq_id in proposals]
        seqs = routed + [s for s in scoring if s.seq_id in proposals]  # routed first: rows 0..len(routed)-1
        if not seqs:
            return []
        backlogs = [s.num_tokens - s.num_cached[LARGE] for s in seqs]
        # (not the large model's first prefill of a prompt, however much of it the prefix cache held)
        catching_up = [s.num_output_tokens > 0 or s.stats.num_large_calls > 0 for s in routed]
        try:
            out = self.runner.forward(LARGE, seqs, backlogs)
        except BackendError as e:  # e.g. the remote endpoint is down: end the requests it names
            for seq in seqs:
                proposals.pop(seq.seq_id, None)  # the others write this token next step
            return [self.output.fail(s, upstream_error(e.errors[s.seq_id])) for s in seqs if s.seq_id in e.errors]
        for seq, backlog, catchup in zip(routed, backlogs, catching_up):
            seq.stats.num_catchup_tokens += backlog - 1 if catchup else 0
            seq.stats.num_large_calls += 1
            seq.waiting_since = None  # (only now: after a BackendError the others come back having waited)
        if not routed:
            return []
        sample = self.runner.sample(out.logits[:len(routed)], routed)
        nonfinite = set(sample.nonfinite_rows)
        for j, seq in enumerate(routed):
            proposals[seq.seq_id] = Proposal(seq, sample=sample, row=j, routed=True, source=LARGE,
                                             error=nonfinite_error(LARGE) if j in nonfinite else None)
        return []

    def hold(self, routed: list[Sequence], proposals: dict[int, Proposal], must_run: bool, step: int
             ) -> list[Sequence]:
        """The routed sequences the large model runs this step: all of them, or none while they wait for others
        to share the call. While at least config.large_wait_min_batch sequences run, a routed token waits up
        to config.large_wait_steps steps; the call runs once one has waited that long, or when the large model
        runs this step anyway (`must_run`: a prompt to score; a `large` or step-mode sequence), or when every
        running sequence waits. A waiting sequence proposes nothing (the small model has nothing new to read)
        and holds no new block; its token is the one the large model would have written at once (unless it is
        preempted meanwhile: then, as any preempted request, it recomputes, and a sampled one draws anew).
        With a remote large model (--large-url) waiting saves nothing: its calls go one request per sequence."""
        cfg, running = self.config, len(self.scheduler.running)
        if (not routed or cfg.large_wait_steps == 0 or running < cfg.large_wait_min_batch
                or len(routed) >= running or must_run or any(s.large_owned for s in routed)
                or any(step - s.waiting_since >= cfg.large_wait_steps
                       for s in routed if s.waiting_since is not None)):
            return routed
        for seq in routed:
            if seq.waiting_since is None:
                seq.waiting_since = step
            seq.stats.num_large_waits += 1
            proposals.pop(seq.seq_id)  # (a fresh one's proposal is the small model's token: never committed)
        return []
