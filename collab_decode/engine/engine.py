"""The engine: one small model, optionally one large model, one scheduler, routing per token or per step.

step() is the whole token path, in public parts:

    plan = scheduler.schedule()                       which sequences run, how many small-model tokens each
                                                      (the usual step, each running sequence decoding one
                                                      token: decode(plan.seqs), which commits the small
                                                      model's tokens at once where no router need be asked,
                                                      else goes on below from route)
    proposals, view = run_small(plan)                 small forward (catch-up chunks + decodes), proposals
    routed = route(proposals, view)                   each distinct router asked once, batched
                                                      (engine/route_step.py)
    large.run(routed, proposals, step)                the large model catches up and writes routed tokens
                                                      (engine/large_step.py)
                                                      (at a large batch they may wait a few steps to share
                                                      one call: hold)
                                                      (and prefills prompts it must score: prompt_logprobs)
                                                      (a BackendError ends only the requests it names)
    outputs = postprocess(proposals)                  append, stop rule, stream (engine/output.py)
    outputs += speculative_step(seqs, ...)            draft/verify sequences (engine/speculative.py)

One request's failure is its own: a proposal whose logits are not finite (NaN/inf), a router that raises
on a sequence, or an error while committing its token ends that request with finish reason "error" (its
blocks freed and zeroed); the rest of the batch goes on as if it had not been there.

The small model's proposal at a routed position is never fed to it (the large model's token replaces
it before either cache sees it), so token-level routing needs no rollback. Decode modes (token, step,
speculative) are the engine's; routers only decide (collab_decode/routing).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from collab_decode.backends.base import Backend, unavailable_reason
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.large_step import LargeStep
from collab_decode.engine.output import (Generation, OutputProcessor, Proposal, RequestOutput, internal_error,
                                         nonfinite_error)
from collab_decode.engine.route_step import SmallView, asks_router, route
from collab_decode.engine.runner import ModelRunner, StepTimes
from collab_decode.engine.scheduler import Scheduler, ScheduleOutput
from collab_decode.engine.sequence import LARGE, SMALL, Sequence
from collab_decode.engine.speculative import speculative_step, split_speculative
from collab_decode.kvcache import KVCacheManager
from collab_decode.routing import Router, RouterContext, RouterInputs, RoutingSpec, build_router, parse_routing
from collab_decode.routing.neural import load_router
from collab_decode.sampling import SampleOutput, SamplingParams, make_generator

__all__ = ["Engine", "Generation"]  # (Generation lives with the other step records, in engine/output.py)

ROUTER_CACHE_SIZE = 64  # routers kept for distinct specs (a request naming a new threshold builds one)

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, small: Backend, tokenizer, config: EngineConfig | None = None, large: Backend | None = None,
                 routers: Mapping[str, str | Path] | None = None, fingerprint: str | None = None):
        """`routers`: neural router checkpoints by name, loaded now; requests name them (the first is the
        default of a spec that names none). `fingerprint`: the pair's (collab_decode.pairs); a router trained
        for another pair is refused."""
        self.config = config or EngineConfig()
        self.backends = {SMALL: small} if large is None else {SMALL: small, LARGE: large}
        self.tokenizer = tokenizer
        self.vocab_size = min([b.vocab_size for b in self.backends.values()] + [len(tokenizer)])
        self.eos_token_ids = {t for b in self.backends.values() for t in b.eos_token_ids} | (
            {tokenizer.eos_token_id} - {None})
        # the context a request may use: the configured limit, capped by what every model was built for
        self.max_model_len = min([self.config.scheduler.max_model_len] +
                                 [b.max_model_len for b in self.backends.values()])
        kv = {name: self._init_cache(name, b) for name, b in self.backends.items()}
        self.scheduler = Scheduler(self.config.scheduler, kv, on_release=self._release)
        self.runner = ModelRunner(self.backends, kv, self.vocab_size)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len, self.config.step_delimiter,
                                      self._finish)
        self.large = LargeStep(self.runner, self.scheduler, self.output, self.config)  # the step's large-model half
        self.fingerprint = fingerprint  # the pair's, when built from model directories (build_engine)
        self.router_context = RouterContext(small.hidden_size, {  # on the small model's device: it reads its tensors
            name: load_router(path, small.hidden_size, fingerprint, small.device)
            for name, path in (routers or {}).items()}, self.vocab_size)
        self._routers: OrderedDict[RoutingSpec, Router | None] = OrderedDict()  # most recently used last
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.num_steps = 0  # steps taken (a routed token's wait is counted in them)

    def _init_cache(self, name: str, backend: Backend) -> KVCacheManager:
        cfg = self.config
        memory = cfg.small_kv_bytes if name == SMALL else cfg.large_kv_bytes
        per_block = backend.kv_bytes_per_token() * cfg.block_size
        num_blocks = max(1, memory // per_block) if per_block else 1 << 20
        backend.init_cache(num_blocks, cfg.block_size)
        # a backend without a paged cache (transformers, a remote endpoint) holds no blocks to share
        return KVCacheManager(num_blocks, cfg.block_size, prefix_caching=cfg.enable_prefix_caching and per_block > 0)

    @property
    def kv(self) -> dict[str, KVCacheManager]:
        return self.scheduler.kv

    @property
    def last_step(self) -> StepTimes:
        return self.runner.times

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                    routing: str | dict | RoutingSpec | None = None, stream_text: bool = True,
                    seq_id: int | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError for a request that can never run.
        `stream_text`: each step's output carries the text of its tokens; False: text comes at the end
        and whenever the caller asks (`self.output.flush_text`), detokenized a window at a time, unless
        a stop string or step routing needs it every step. `seq_id`: the caller's id for it (an engine
        process's client numbers the requests it sends without waiting for an answer), unused by any request
        in the engine; None: the engine numbers it."""
        sampling = sampling or SamplingParams()
        spec = parse_routing(routing or self.config.default_policy)
        router = self.router_for(spec)
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self.seqs:  # (past an id a caller chose)
                seq_id = next(self._ids)
        elif seq_id in self.seqs:
            raise ValueError(f"request id {seq_id} is in use")
        seq = Sequence(seq_id, list(prompt_ids), sampling, arrival=time.monotonic_ns(), spec=spec,
                       router=router, router_state=router.new_state(sampling.seed) if router else None,
                       generator=make_generator(sampling.seed, self.backends[SMALL].device), stream_text=stream_text)
        self._validate(seq)
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def router_for(self, spec: RoutingSpec) -> Router | None:
        """The router of a spec, built once and shared by every sequence that names the same spec."""
        if spec not in self._routers:
            self._routers[spec] = build_router(spec, self.router_context)
            if len(self._routers) > ROUTER_CACHE_SIZE:
                self._routers.popitem(last=False)
        self._routers.move_to_end(spec)
        return self._routers[spec]

    def _validate(self, seq: Sequence) -> None:
        prompt_ids, sampling = seq.prompt_ids, seq.sampling
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) out of range [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                             f"exceeds the context length {self.max_model_len}")
        if seq.uses_large and LARGE not in self.backends:
            raise ValueError(f"policy {seq.spec.policy!r} needs a large model; this engine has only one model")
        if not self.scheduler.can_ever_fit(len(prompt_ids) + sampling.max_tokens + seq.lookahead):
            raise ValueError("the request needs more KV cache than the pools hold; grant more cache memory")

    def abort(self, seq_id: int) -> None:
        """Stop a request now and return its blocks (a client went away)."""
        seq = self.seqs.get(seq_id)
        if seq is not None and not seq.finished:
            self._finish(seq, "abort")

    def max_tokens_left(self, num_prompt_tokens: int) -> int:
        """What the context leaves for output after a prompt (the default max_tokens of chat and the CLI)."""
        return max(1, self.max_model_len - num_prompt_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def close(self) -> None:
        """Let go of what the backends hold outside this process (a remote backend's connections)."""
        for backend in self.backends.values():
            if hasattr(backend, "close"):
                backend.close()

    def unavailable_models(self) -> dict[str, str]:
        """Models that cannot serve now, with why (a remote endpoint that is down). Safe from any thread:
        it reads only the backends' own thread-safe state."""
        reasons = {name: unavailable_reason(b) for name, b in self.backends.items()}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule, the small model's forward, routing, the large model's, commit."""
        if torch.is_inference_mode_enabled():  # the caller's loop already is (generate, the engine process)
            return self._step()
        with torch.inference_mode():  # entering costs ~3 us: a loop of steps enters once, around the loop
            return self._step()

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self.num_steps += 1
        self.runner.times = StepTimes()
        plan = self.scheduler.schedule()
        # at low load the cores the engine's threads leave (the server's, idle then) take the long chunks
        low_load = len(self.scheduler.running) <= self.config.chunk_threads_max_batch
        self.runner.chunk_threads = self.config.chunk_threads if low_load else 0
        if plan.decodes_only:
            outputs = self.decode(plan.seqs)  # the usual step: one token each, nothing else to schedule
        else:
            token_plan, spec_seqs = split_speculative(plan)
            proposals, small_view = self.run_small(token_plan)  # seq_id -> proposed token; the small model's view
            outputs = self.route_and_commit(proposals, small_view)
            if spec_seqs:
                outputs += speculative_step(spec_seqs, self.runner, self.scheduler, self.output)
        self.runner.times.total = time.perf_counter() - t0
        return outputs

    # ---- step parts -----------------------------------------------------------------------------
    def run_small(self, plan: ScheduleOutput) -> tuple[dict[int, Proposal], SmallView | None]:
        """Small forward over every scheduled chunk; sample proposals where a sequence reached its end.
        Also returns what the small model saw at those sequences' last positions, for the routers."""
        proposals: dict[int, Proposal] = {}
        seqs, num_new = [], []
        for seq, n in zip(plan.seqs, plan.num_new_tokens):
            if n:
                seqs.append(seq)
                num_new.append(n)
            else:
                proposals[seq.seq_id] = Proposal(seq, routed=True)  # large-owned or waiting: no small forward
        if not seqs:
            return proposals, None
        out = self.runner.forward(SMALL, seqs, num_new)
        rows = [i for i, s in enumerate(seqs) if s.num_cached[SMALL] == s.num_tokens]
        if not rows:
            return proposals, None
        if len(rows) == len(seqs):  # the usual decode step: every row samples, no gather needed
            sampled, logits, hidden = seqs, out.logits, out.hidden
        else:
            idx = torch.tensor(rows)
            sampled, logits, hidden = [seqs[i] for i in rows], out.logits[idx], out.hidden[idx]
        return self.propose(sampled, self.runner.vocab_logits(logits), hidden, proposals)

    def propose(self, seqs: list[Sequence], logits: torch.Tensor, hidden: torch.Tensor,
                proposals: dict[int, Proposal], sample: SampleOutput | None = None
                ) -> tuple[dict[int, Proposal], SmallView | None]:
        """The small model's proposals at the last positions of `seqs` (rows of (B, V) logits and (B, H) hidden),
        sampled here unless `sample` holds them, into `proposals`; with what the routers must see, if any asks."""
        sample = self.sample_small(seqs, logits) if sample is None else sample
        nonfinite = set(sample.nonfinite_rows)
        for j, seq in enumerate(seqs):
            proposals[seq.seq_id] = Proposal(seq, sample=sample, row=j,
                                             error=nonfinite_error(SMALL) if j in nonfinite else None)
        if not asks_router(seqs, sample.top1_probs):  # route() needs no view
            return proposals, None
        small = self.backends[SMALL]
        inputs = RouterInputs([s.router_state for s in seqs], logits, hidden, sample.token_tensor, small.embed,
                              sample.row_max, seqs, sample.top1_probs, sample.token_id_list,
                              getattr(small, "embedding", None))
        return proposals, SmallView(seqs, inputs)

    def sample_small(self, seqs: list[Sequence], logits: torch.Tensor) -> SampleOutput:
        """The small model's token for each row (and the top-1 probabilities a gated router reads, if any will)."""
        top1 = any(s.reads_top1 for s in seqs) and any(s.uses_large for s in seqs)
        return self.runner.sample(logits, seqs, top1)

    def decode(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """The usual step (a ScheduleOutput.decodes_only plan): each sequence decodes one token. Where every row is
        finite and no router need be asked (`small`; a gated router's sure rows), the small model's tokens are
        committed at once; otherwise the step goes on as any other does (propose, route, the large model)."""
        out = self.runner.forward_last(SMALL, seqs)
        logits = self.runner.vocab_logits(out.logits)
        sample = self.sample_small(seqs, logits)
        if sample.nonfinite_rows or asks_router(seqs, sample.top1_probs):
            return self.route_and_commit(*self.propose(seqs, logits, out.hidden, {}, sample))
        ids = sample.token_id_list
        return [self._commit_token(seq, ids[j], SMALL, sample, j) for j, seq in enumerate(seqs)]

    def route_and_commit(self, proposals: dict[int, Proposal], view: SmallView | None) -> list[RequestOutput]:
        """Ask the routers, run the large model where they route (and for prompts it scores), commit every token."""
        routed = route(proposals, view, self.runner.times)
        failed = self.large.run(routed, proposals, self.num_steps)
        return failed + self.postprocess(proposals)

    def postprocess(self, proposals: dict[int, Proposal]) -> list[RequestOutput]:
        """Commit each sequence's token and decide whether its request ends; end those that failed."""
        return [self._commit(p) for p in proposals.values()
                if not p.seq.finished and (p.sample is not None or p.error is not None)]

    def _commit(self, p: Proposal) -> RequestOutput:
        if p.error is not None:
            return self.output.fail(p.seq, p.error)
        return self._commit_token(p.seq, p.sample.token_id_list[p.row], p.source, p.sample, p.row)

    def _commit_token(self, seq: Sequence, token: int, source: str, sample: SampleOutput, row: int) -> RequestOutput:
        try:
            self.output.append(seq, token, source, sample, row)
            return self.output.postprocess(seq, 1)
        except Exception:  # e.g. detokenizing, a stop rule, a router's observe: this request only
            log.exception("committing a token of sequence %d failed: that request fails", seq.seq_id)
            return self.output.fail(seq, internal_error("finishing", seq.seq_id))

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason == "error":
            self._clear_blocks(seq)
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.seq_id, None)

    def _clear_blocks(self, seq: Sequence) -> None:
        """Zero a failed sequence's K/V before its blocks go back to the pool: they may hold NaN, and attention
        multiplies the masked slots of the next owner's last block by 0 (0 * NaN = NaN)."""
        for name, backend in self.backends.items():
            if self.kv[name].has(seq.seq_id) and hasattr(backend, "clear_blocks"):
                backend.clear_blocks(self.kv[name].forget_content(seq.seq_id))  # (blocks it shares: others' K/V)

    def _release(self, seq_id: int) -> None:
        """The scheduler freed this sequence's blocks: drop what backends hold for it (the transformers
        fallback's caches)."""
        for backend in self.backends.values():
            backend.release(seq_id)

    # ---- offline API ----------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 routing: str | RoutingSpec | list | None = None, progress: bool = False) -> list[Generation]:
        """Run prompts (text or token ids) to completion; results in prompt order."""
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        routings = routing if isinstance(routing, list) else [routing] * n
        ids = []
        for prompt, s, r in zip(prompts, samplings, routings):
            if isinstance(prompt, str):
                prompt = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids.append(self.add_request(prompt, s, r, stream_text=False))  # the text is read at the end
        results: dict[int, Generation] = {}
        with torch.inference_mode():
            while len(results) < n:
                for out in self.step():
                    if out.finished and out.seq_id in ids:
                        results[out.seq_id] = Generation.from_sequence(out.seq)
                if progress:
                    print(f"\r{len(results)}/{n} done", end="", flush=True)
        if progress:
            print()
        return [results[i] for i in ids]

