"""The engine: one small model, optionally one large model, one scheduler, routing per token.

step() is the whole token path: schedule -> small forward -> route -> large forward where routed ->
commit. The small model's proposal at a routed position is never fed to it (the large model's token
replaces it before either cache sees it), so token-level routing needs no rollback. Sequences whose
policy is speculative take the draft/verify path instead (engine/speculative.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from collab_decode.backends.base import Backend, ModelInput, SeqChunk
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.output import Detokenizer, RequestOutput, make_output
from collab_decode.engine.scheduler import Scheduler, ScheduleOutput
from collab_decode.engine.sequence import LARGE, SMALL, Sequence, Status
from collab_decode.kvcache import KVCacheManager, num_blocks_for_budget
from collab_decode.routing import RouterInputs, RoutingPolicy, parse_policy
from collab_decode.sampling import Sampler, SamplingParams, make_generator


@dataclass
class StepTimes:
    """Seconds spent in one step, by part (for the engine-overhead benchmark)."""

    small_forward: float = 0.0
    large_forward: float = 0.0
    total: float = 0.0


class Engine:
    def __init__(self, small: Backend, tokenizer, config: EngineConfig | None = None, large: Backend | None = None):
        self.config = config or EngineConfig()
        self.backends = {SMALL: small} if large is None else {SMALL: small, LARGE: large}
        self.tokenizer = tokenizer
        self.vocab_size = min([b.vocab_size for b in self.backends.values()] + [len(tokenizer)])
        self.eos_token_ids = {t for b in self.backends.values() for t in b.eos_token_ids} | (
            {tokenizer.eos_token_id} - {None})
        # the context a request may use: the configured limit, capped by what every model was built for
        model_limits = [b.config.max_position_embeddings for b in self.backends.values()
                        if hasattr(getattr(b, "config", None), "max_position_embeddings")]
        self.max_model_len = min([self.config.scheduler.max_model_len] + model_limits)
        kv = {name: self._init_cache(name, b) for name, b in self.backends.items()}
        self.scheduler = Scheduler(self.config.scheduler, kv, on_release=self._release)
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(tokenizer)
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.last_step = StepTimes()

    def _init_cache(self, name: str, backend: Backend) -> KVCacheManager:
        cfg = self.config
        memory = cfg.small_kv_bytes if name == SMALL else cfg.large_kv_bytes
        per_block = backend.kv_bytes_per_token() * cfg.block_size
        num_blocks = max(1, memory // per_block) if per_block else 1 << 20
        backend.init_cache(num_blocks, cfg.block_size)
        return KVCacheManager(num_blocks, cfg.block_size)

    @property
    def kv(self) -> dict[str, KVCacheManager]:
        return self.scheduler.kv

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                    routing: str | RoutingPolicy | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError for a request that can never run."""
        sampling = sampling or SamplingParams()
        policy = parse_policy(routing or self.config.default_policy, self)
        self._validate(prompt_ids, sampling, policy)
        seq = Sequence(next(self._ids), list(prompt_ids), sampling, arrival=time.monotonic_ns(), policy=policy,
                       policy_state=policy.new_state(sampling.seed),
                       generator=make_generator(sampling.seed, getattr(self.backends[SMALL], "device", "cpu")))
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def _validate(self, prompt_ids: list[int], sampling: SamplingParams, policy: RoutingPolicy) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) out of range [0, {self.vocab_size}): {bad[:5]}")
        max_len = self.max_model_len
        if len(prompt_ids) + sampling.max_tokens > max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                             f"exceeds the context length {max_len}")
        if policy.uses_large and LARGE not in self.backends:
            raise ValueError(f"policy {policy.name!r} needs a large model; this engine has only one model")
        if not self.scheduler.can_ever_fit(len(prompt_ids) + sampling.max_tokens + policy.lookahead):
            raise ValueError("the request needs more KV cache than the pools hold; grant more cache memory")

    def abort(self, seq_id: int) -> None:
        """Stop a request now and return its blocks (a client went away)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def max_tokens_left(self, num_prompt_tokens: int) -> int:
        """What the context leaves for output after a prompt (the default max_tokens of chat and the CLI)."""
        return max(1, self.max_model_len - num_prompt_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self.last_step = StepTimes()
        plan = self.scheduler.schedule()
        token_plan, spec_seqs = self._split_speculative(plan)
        proposals, small_view = self._run_small(token_plan)  # seq_id -> proposed token; the small model's view
        routed = self._route(proposals, small_view)
        self._run_large(routed, proposals)
        outputs = self._commit(proposals)
        if spec_seqs:
            outputs += self._speculative_step(spec_seqs)
        self.last_step.total = time.perf_counter() - t0
        return outputs

    # ---- step parts -----------------------------------------------------------------------------
    def _split_speculative(self, plan: ScheduleOutput) -> tuple[ScheduleOutput, list[Sequence]]:
        """Speculative sequences whose chunk reaches their last token draft and verify this step; those
        still prefilling a long prompt stay with the token-level batch, which runs their chunk (within
        the step's token budget) and proposes nothing for them."""
        if not any(s.policy.speculative for s in plan.seqs):
            return plan, []
        drafting = [s.policy.speculative and done for s, done in zip(plan.seqs, plan.sampled())]
        keep = [i for i, d in enumerate(drafting) if not d]
        spec = [s for s, d in zip(plan.seqs, drafting) if d]
        token_plan = ScheduleOutput([plan.seqs[i] for i in keep], [plan.num_new_tokens[i] for i in keep])
        return token_plan, spec

    def _forward(self, model: str, seqs: list[Sequence], num_new: list[int], all_positions=False):
        """Run `model` on each seq's next num_new tokens from its num_cached; advance num_cached."""
        chunks = []
        for seq, n in zip(seqs, num_new):
            start = seq.num_cached[model]
            chunks.append(SeqChunk(seq.seq_id, seq.token_ids[start:start + n], start,
                                   self.kv[model].block_table(seq.seq_id), all_positions))
        t0 = time.perf_counter()
        out = self.backends[model].forward(ModelInput(chunks))
        elapsed = time.perf_counter() - t0
        if model == SMALL:
            self.last_step.small_forward += elapsed
        else:
            self.last_step.large_forward += elapsed
        for seq, n in zip(seqs, num_new):
            seq.num_cached[model] += n
        return out

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        logits = logits[:, :self.vocab_size]
        return self.sampler.sample(logits, [s.sampling for s in seqs], [s.generator for s in seqs])

    def _run_small(self, plan: ScheduleOutput) -> tuple[dict[int, "Proposal"], RouterInputs | None]:
        """Small forward over every scheduled chunk; sample proposals where a sequence reached its end.
        Also returns what the small model saw at those sequences' last positions, for the policies."""
        proposals: dict[int, Proposal] = {}
        run = [(s, n) for s, n in zip(plan.seqs, plan.num_new_tokens) if n > 0]
        for seq, n in zip(plan.seqs, plan.num_new_tokens):
            if n == 0:
                proposals[seq.seq_id] = Proposal(seq, routed=True)  # large-owned: no small forward
        if not run:
            return proposals, None
        seqs, num_new = [s for s, _ in run], [n for _, n in run]
        out = self._forward(SMALL, seqs, num_new)
        rows = [i for i, s in enumerate(seqs) if s.num_cached[SMALL] == s.num_tokens]
        if not rows:
            return proposals, None
        if len(rows) == len(seqs):  # the usual decode step: every row samples, no gather needed
            sampled, logits, hidden = seqs, out.logits[:, :self.vocab_size], out.hidden
        else:
            idx = torch.tensor(rows)
            sampled, logits, hidden = [seqs[i] for i in rows], out.logits[idx, :self.vocab_size], out.hidden[idx]
        sample = self._sample(logits, sampled)
        for j, seq in enumerate(sampled):
            proposals[seq.seq_id] = Proposal(seq, sample=sample, row=j)
        view = RouterInputs(sampled, logits, hidden, sample.token_ids, self.backends[SMALL].embed)
        return proposals, view

    def _route(self, proposals: dict[int, "Proposal"], view: RouterInputs | None) -> list[Sequence]:
        """Ask each policy about its sequences (batched per policy); mark routed proposals."""
        by_policy: dict[int, list[int]] = {}
        for i, seq in enumerate(view.seqs if view is not None else []):
            if seq.policy.uses_large:
                by_policy.setdefault(id(seq.policy), []).append(i)
        for rows in by_policy.values():
            idx = torch.tensor(rows)
            inputs = RouterInputs([view.seqs[i] for i in rows], view.logits[idx], view.hidden[idx],
                                  view.proposed[idx], view.embed)
            for i, routed in zip(rows, inputs.seqs[0].policy.decide(inputs).tolist()):
                proposals[view.seqs[i].seq_id].routed = routed
        return [p.seq for p in proposals.values() if p.routed]

    def _run_large(self, routed: list[Sequence], proposals: dict[int, "Proposal"]) -> None:
        """The large model catches up on each routed sequence's backlog and writes its next token."""
        if not routed:
            return
        for seq in self.scheduler.reserve(LARGE, routed, [s.num_tokens for s in routed]):
            proposals.pop(seq.seq_id, None)  # preempted: it will recompute from scratch
        routed = [s for s in routed if s.seq_id in proposals]
        if not routed:
            return
        for seq in routed:
            backlog = seq.num_tokens - seq.num_cached[LARGE]
            if seq.num_cached[LARGE] > 0 or seq.num_output_tokens > 0:
                seq.stats.num_catchup_tokens += backlog - 1
            seq.stats.num_large_calls += 1
        out = self._forward(LARGE, routed, [s.num_tokens - s.num_cached[LARGE] for s in routed])
        sample = self._sample(out.logits, routed)
        for j, seq in enumerate(routed):
            proposals[seq.seq_id] = Proposal(seq, sample=sample, row=j, routed=True, source=LARGE)

    def _commit(self, proposals: dict[int, "Proposal"]) -> list[RequestOutput]:
        outputs = []
        for p in proposals.values():
            if p.sample is None or p.seq.finished:
                continue
            self._append(p.seq, int(p.sample.token_ids[p.row]), p.source, p.sample, p.row)
            outputs.append(self._finish_check(p.seq, 1))
        return outputs

    def _append(self, seq: Sequence, token: int, source: str, sample, row: int) -> None:
        seq.append(token, source)
        if seq.sampling.logprobs is not None:
            seq.logprobs.append(float(sample.logprobs[row]))
            if sample.top_ids is not None and seq.sampling.logprobs > 0:
                n = seq.sampling.logprobs
                seq.top_logprobs.append(list(zip(sample.top_ids[row, :n].tolist(),
                                                 sample.top_logprobs[row, :n].tolist())))

    def _finish_check(self, seq: Sequence, num_new: int) -> RequestOutput:
        """Detokenize, apply stop conditions, tell the policy about step ends; the step's output."""
        last = seq.token_ids[-1]
        reason = None
        if (last in self.eos_token_ids and not seq.sampling.ignore_eos) or last in seq.sampling.stop_token_ids:
            reason = "stop"
        elif seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        new_text, stopped = self.detokenizer.update(seq, final=reason is not None)
        if stopped:
            reason = "stop"
        # step ends are read from all text decoded so far, not from output_text (which holds back characters);
        # while a UTF-8 character is incomplete the decoded text is stale and ends no step
        pending = seq.detok_offsets[1] < seq.num_output_tokens
        seq.policy.observe(seq, not pending and seq.decoded_text.endswith(self.config.step_delimiter))
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.seq_id, None)
        return make_output(seq, num_new, new_text)

    def _release(self, seq_id: int) -> None:
        """The scheduler freed this sequence's blocks: drop what backends hold for it (the transformers
        fallback's caches)."""
        for backend in self.backends.values():
            backend.release(seq_id)

    def _speculative_step(self, seqs: list[Sequence]) -> list[RequestOutput]:
        from collab_decode.engine.speculative import speculative_step

        return speculative_step(self, seqs)

    # ---- offline API ----------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
                 routing: str | list[str] | None = None, progress: bool = False) -> list["Generation"]:
        """Run prompts (text or token ids) to completion; results in prompt order."""
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        routings = routing if isinstance(routing, list) else [routing] * n
        ids = []
        for prompt, s, r in zip(prompts, samplings, routings):
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"] if isinstance(prompt, str) else prompt
            ids.append(self.add_request(prompt_ids, s, r))
        results: dict[int, Generation] = {}
        while len(results) < n:
            for out in self.step():
                if out.finished and out.seq_id in ids:
                    results[out.seq_id] = Generation.from_sequence(out.seq)
            if progress:
                print(f"\r{len(results)}/{n} done", end="", flush=True)
        if progress:
            print()
        return [results[i] for i in ids]


@dataclass
class Proposal:
    """A sequence's candidate next token this step, and who wrote it."""

    seq: Sequence
    sample: object = None  # SampleOutput holding the token (None until sampled)
    row: int = 0  # row of that SampleOutput
    routed: bool = False  # the large model writes this token
    source: str = SMALL


@dataclass
class Generation:
    """A finished request, for the offline API and the CLI."""

    text: str
    token_ids: list[int]
    provenance: list[str]
    finish_reason: str
    stats: dict
    prompt_token_ids: list[int]
    logprobs: list[float]

    @classmethod
    def from_sequence(cls, seq: Sequence) -> "Generation":
        return cls(text=seq.output_text, token_ids=seq.output_ids, provenance=list(seq.provenance),
                   finish_reason=seq.finish_reason, stats=seq.stats.as_dict(),
                   prompt_token_ids=list(seq.prompt_ids), logprobs=list(seq.logprobs))
