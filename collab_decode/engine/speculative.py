"""Speculative decoding, the lossless baseline: the small model drafts k tokens, the large model
verifies all of them (and one bonus position) in one forward.

Acceptance is standard rejection sampling: draft d_i, drawn from the small model's processed
distribution q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)) under the large model's p_i;
the first rejected position is resampled from normalize(max(0, p_i - q_i)); if every draft is kept,
a bonus token is drawn from p_{k+1}. The output is distributed as the large model's own sampling,
and with greedy sampling (one-hot p and q) it equals the large model's greedy output exactly.
Rollback is bookkeeping: both models' `num_cached` drop to the kept prefix and surplus blocks are freed.
A sequence whose draft or verify logits are not finite, or whose verification raises, fails alone.
"""

from __future__ import annotations

import logging

import torch

from collab_decode.backends.base import BackendError
from collab_decode.engine.output import OutputProcessor, RequestOutput, internal_error, nonfinite_error, upstream_error
from collab_decode.engine.runner import ModelRunner
from collab_decode.engine.scheduler import Scheduler, ScheduleOutput
from collab_decode.engine.sequence import LARGE, SMALL, Sequence, Status
from collab_decode.sampling import logprobs_of, nonfinite_rows, processed_probs

log = logging.getLogger(__name__)


def split_speculative(plan: ScheduleOutput) -> tuple[ScheduleOutput, list[Sequence]]:
    """Speculative sequences whose chunk reaches their last token draft and verify this step; those
    still prefilling a long prompt stay with the token-level batch, which runs their chunk (within
    the step's token budget) and proposes nothing for them."""
    if not any(s.mode == "speculative" for s in plan.seqs):
        return plan, []
    drafting = [s.mode == "speculative" and done for s, done in zip(plan.seqs, plan.sampled())]
    keep = [i for i, d in enumerate(drafting) if not d]
    spec = [s for s, d in zip(plan.seqs, drafting) if d]
    token_plan = ScheduleOutput([plan.seqs[i] for i in keep], [plan.num_new_tokens[i] for i in keep])
    return token_plan, spec


def _draft_lengths(seqs: list[Sequence], max_len: int) -> list[int]:
    # never draft past what the request may still emit (the verify step adds one more token)
    return [max(0, min(s.spec.k, s.sampling.max_tokens - s.num_output_tokens - 1, max_len - s.num_tokens - 1))
            for s in seqs]


def _draft(runner: ModelRunner, seqs: list[Sequence], ks: list[int]) -> tuple[list[int], dict[int, list[torch.Tensor]]]:
    """Append up to k small-model drafts to each sequence; returns base lengths and draft distributions."""
    base = [s.num_tokens for s in seqs]
    draft_probs: dict[int, list[torch.Tensor]] = {s.seq_id: [] for s in seqs}
    for step in range(max(ks, default=0)):
        active = [s for s, k in zip(seqs, ks) if step < k and s.status is Status.RUNNING]
        if not active:
            break
        out = runner.forward(SMALL, active, [s.num_tokens - s.num_cached[SMALL] for s in active])
        logits = out.logits[:, :runner.vocab_size]
        q = processed_probs(logits, [s.sampling for s in active])  # (B, V)
        tokens = runner.sample(logits, active).token_ids
        for i, seq in enumerate(active):
            seq.token_ids.append(int(tokens[i]))
            draft_probs[seq.seq_id].append(q[i])
    return base, draft_probs


def _accept(seq: Sequence, drafts: list[int], q: list[torch.Tensor], p: torch.Tensor) -> list[int]:
    """The committed tokens: the kept drafts, then one token from the large model. p (len(drafts)+1, V)."""
    greedy = seq.sampling.greedy
    if greedy:  # one-hot p and q: keep drafts while they equal the large model's argmax, then take its token
        targets = p.argmax(-1).tolist()
        n = next((i for i, (d, t) in enumerate(zip(drafts, targets)) if d != t), len(drafts))
        return drafts[:n] + [targets[n]]
    kept: list[int] = []
    for i, token in enumerate(drafts):
        ratio = float(p[i, token] / q[i][token].clamp_min(1e-20))
        if ratio >= 1 or float(torch.rand((), generator=seq.generator, device=p.device)) < ratio:
            kept.append(token)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if residual.sum() <= 0:
            return kept + [int(p[i].argmax())]
        return kept + [int(torch.multinomial(residual / residual.sum(), 1, generator=seq.generator))]
    return kept + [int(torch.multinomial(p[len(drafts)], 1, generator=seq.generator))]


def speculative_step(seqs: list[Sequence], runner: ModelRunner, scheduler: Scheduler, output: OutputProcessor
                     ) -> list[RequestOutput]:
    """Draft, verify and commit for sequences in speculative mode whose prompt is prefilled."""
    ks = _draft_lengths(seqs, output.max_model_len)
    for seq, k in zip(seqs, ks):  # small-model room for the backlog and k - 1 fed-back drafts
        if seq.status is Status.RUNNING:
            scheduler.reserve(SMALL, [seq], [seq.num_tokens + k])
    live = [(s, k) for s, k in zip(seqs, ks) if s.status is Status.RUNNING]
    seqs, ks = [s for s, _ in live], [k for _, k in live]
    base, draft_probs = _draft(runner, seqs, ks)
    preempted = scheduler.reserve(LARGE, seqs, [s.num_tokens for s in seqs])
    for seq, n in zip(seqs, base):
        if seq in preempted:
            del seq.token_ids[n:]  # drop its drafts; it restarts from its committed tokens
    keep = [i for i, s in enumerate(seqs) if s.status is Status.RUNNING]
    seqs, base = [seqs[i] for i in keep], [base[i] for i in keep]
    if not seqs:
        return []
    num_new = [s.num_tokens - s.num_cached[LARGE] for s in seqs]
    try:
        out = runner.forward(LARGE, seqs, num_new, all_positions=True)
    except BackendError as e:  # e.g. the remote endpoint is down
        return _abandon_drafts(scheduler, output, seqs, base, e)
    outputs = []
    for seq, n0, chunk_len in zip(seqs, base, num_new):
        logits = out.all_logits[seq.seq_id][chunk_len - (seq.num_tokens - n0) - 1:, :runner.vocab_size]  # (k+1, V)
        try:
            outputs.append(_verify(scheduler, output, seq, n0, draft_probs[seq.seq_id], logits))
        except Exception:  # this request only: the others verify as if it had not been there
            log.exception("verifying the drafts of sequence %d failed: that request fails", seq.seq_id)
            del seq.token_ids[n0:]  # its drafts, or tokens committed before the error (never delivered)
            outputs.append(output.fail(seq, internal_error("verifying", seq.seq_id)))
    return outputs


def _verify(scheduler: Scheduler, output: OutputProcessor, seq: Sequence, n0: int, q: list[torch.Tensor],
            logits: torch.Tensor) -> RequestOutput:
    """Keep or reject seq's drafts (tokens n0:) under the large model's (k+1, V) logits, and commit."""
    drafts = seq.token_ids[n0:]
    broken = _nonfinite_model(logits, q)
    if broken is not None:
        del seq.token_ids[n0:]
        return output.fail(seq, nonfinite_error(broken))
    p = processed_probs(logits, [seq.sampling] * logits.shape[0])
    committed = _accept(seq, drafts, q, p)
    del seq.token_ids[n0:]
    seq.stats.num_large_calls += 1
    return _commit(scheduler, output, seq, committed, len(committed) - 1, logits)


def _nonfinite_model(logits: torch.Tensor, q: list[torch.Tensor]) -> str | None:
    """The model whose numbers for this sequence are not finite (the large model's verify logits, else the small
    model's draft distributions), or None; one host sync."""
    flags = [nonfinite_rows(logits).any()] + ([~torch.stack(q).isfinite().all()] if q else [])
    large, *small = torch.stack(flags).tolist()
    return LARGE if large else SMALL if any(small) else None


def _abandon_drafts(scheduler: Scheduler, output: OutputProcessor, seqs: list[Sequence], base: list[int],
                    error: BackendError) -> list[RequestOutput]:
    """Verification failed: drop every draft and roll the small cache back so that the newest committed
    token is fed again next step; end the requests the error names, the others draft again next step."""
    for seq, n0 in zip(seqs, base):
        del seq.token_ids[n0:]
        scheduler.truncate(seq, SMALL, min(seq.num_cached[SMALL], n0 - 1))
    return [output.fail(s, upstream_error(error.errors[s.seq_id])) for s in seqs if s.seq_id in error.errors]


def _commit(scheduler: Scheduler, output: OutputProcessor, seq: Sequence, committed: list[int], num_kept: int,
            logits: torch.Tensor) -> RequestOutput:
    n0 = seq.num_tokens
    # every committed token was decided by the large model: its logprobs are the large model's
    sample = logprobs_of(logits[:len(committed)].float(), torch.tensor(committed, device=logits.device),
                         [seq.sampling] * len(committed))
    num_new = 0
    for i, token in enumerate(committed):
        output.append(seq, token, SMALL if i < num_kept else LARGE, sample, i)
        num_new += 1
        if output.stop_reason(seq) is not None:
            break
    # caches keep only what both agree on: the committed prefix, minus the newest token (not yet fed)
    for model in (SMALL, LARGE):
        scheduler.truncate(seq, model, min(seq.num_cached[model], n0 + min(num_new, num_kept)))
        kv = scheduler.kv[model]
        if kv.prefix_caching:  # the committed tokens' blocks (the cache now holds no draft nor the newest token)
            kv.register(seq.seq_id, seq.token_ids, seq.num_cached[model])
    return output.postprocess(seq, num_new)
