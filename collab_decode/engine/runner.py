"""The model runner: turns the engine's sequences into backend batches and samples from the results.

`forward(model, seqs, num_new)` sends each sequence's next `num_new` tokens from that model's
`num_cached` (the catch-up rule) with its block table, and advances `num_cached`; `sample` picks a token
per row with each request's own parameters and generator. Time spent in each model is recorded per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from collab_decode.backends.base import Backend, ModelInput, ModelOutput, SeqChunk
from collab_decode.engine.output import record_prompt_logprobs
from collab_decode.engine.sequence import SMALL, Sequence
from collab_decode.kvcache import KVCacheManager
from collab_decode.sampling import SampleOutput, Sampler


# new tokens from which a large-model forward is a chunk (a prompt, a catch-up) for chunk_threads. Only the
# large model's: the demo large model (256 wide) runs a 33-token chunk in 5.6 ms on 1 thread and 4.6 on 2, a
# 100-token one in 11.8 and 8.6; the small one (64 wide) gains nothing (100 tokens: 1.25 and 1.17 ms), and
# behind the server its chunks on 2 threads cost `small` 5% at concurrency 1 (the API process takes the core)
CHUNK_MIN_TOKENS = 8


@dataclass
class StepTimes:
    """Seconds spent in one step, by part (for the engine-overhead benchmark)."""

    small_forward: float = 0.0
    large_forward: float = 0.0
    route: float = 0.0  # the routers' decide calls
    total: float = 0.0


class ModelRunner:
    def __init__(self, backends: dict[str, Backend], kv: dict[str, KVCacheManager], vocab_size: int):
        self.backends = backends  # SMALL (and LARGE) -> backend
        self.kv = kv  # the scheduler's block bookkeeping, per model
        self.vocab_size = vocab_size  # ids every model and the tokenizer know (padding rows are cut off)
        self.sampler = Sampler()
        self.times = StepTimes()
        self.num_forwards = {name: 0 for name in backends}  # forwards so far per model (however many sequences each)
        # torch threads for a large forward of >= CHUNK_MIN_TOKENS tokens (0: unchanged); the engine sets it each step
        self.chunk_threads = 0

    def forward(self, model: str, seqs: list[Sequence], num_new: list[int], all_positions: bool = False
                ) -> ModelOutput:
        """Run `model` on each seq's next num_new tokens from its num_cached; advance num_cached. Sequences
        that asked for prompt logprobs get them from their prompt_scorer's chunks over the prompt (each
        prompt position scored once, whatever the chunking or a recompute after preemption)."""
        chunks = []
        scoring = [s.needs_prompt_logprobs and model == s.prompt_scorer for s in seqs]
        for seq, n, scores in zip(seqs, num_new, scoring):
            start = seq.num_cached[model]
            chunks.append(SeqChunk(seq.seq_id, seq.token_ids[start:start + n], start,
                                   self.kv[model].block_table(seq.seq_id), all_positions or scores))
        out = self._run(model, chunks, sum(num_new))
        kv = self.kv[model]
        for seq, chunk, n, scores in zip(seqs, chunks, num_new, scoring):
            if scores:
                record_prompt_logprobs(seq, chunk.num_cached, out.all_logits[seq.seq_id][:, :self.vocab_size])
            seq.num_cached[model] += n
            if kv.prefix_caching and seq.num_cached[model] == seq.num_tokens and not scores \
                    and seq.mode != "speculative":
                # blocks enter the cache at a forward whose last row this step samples and checks (a row with NaN
                # fails its request, whose own blocks then leave the cache before another request can match them);
                # a speculative sequence's, only what verification commits (speculative._commit)
                kv.register(seq.seq_id, seq.token_ids, seq.num_cached[model])
        return out

    def forward_last(self, model: str, seqs: list[Sequence]) -> ModelOutput:
        """`forward` of each seq's one new token (its last; the model's cache holds the rest), with nothing to
        score: the usual decode step, its chunks built without forward's general bookkeeping."""
        table = self.kv[model].block_table
        chunks = [SeqChunk(seq.seq_id, seq.token_ids[-1:], len(seq.token_ids) - 1, table(seq.seq_id)) for seq in seqs]
        out = self._run(model, chunks, len(chunks))
        kv = self.kv[model]
        size = kv.block_size if kv.prefix_caching else 0
        for seq in seqs:
            seq.num_cached[model] += 1
            if size and seq.num_cached[model] % size == 0:  # a block filled (never a speculative sequence's step)
                kv.register(seq.seq_id, seq.token_ids, seq.num_cached[model])
        return out

    def _run(self, model: str, chunks: list[SeqChunk], num_tokens: int) -> ModelOutput:
        """One timed forward of `model` over these chunks (num_tokens new tokens in all)."""
        t0 = time.perf_counter()
        if self.chunk_threads and model != SMALL and num_tokens >= CHUNK_MIN_TOKENS:
            out = self._forward_threaded(model, chunks)
        else:
            out = self.backends[model].forward(ModelInput(chunks))
        elapsed = time.perf_counter() - t0
        self.num_forwards[model] += 1
        if model == SMALL:
            self.times.small_forward += elapsed
        else:
            self.times.large_forward += elapsed
        return out

    def _forward_threaded(self, model: str, chunks: list[SeqChunk]) -> ModelOutput:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.chunk_threads)  # ~0.1 us a switch
        try:
            return self.backends[model].forward(ModelInput(chunks))
        finally:
            torch.set_num_threads(threads)

    def vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V') -> (B, V): the columns of ids the tokenizer knows (a model's padding rows cut off)."""
        return logits if logits.shape[-1] == self.vocab_size else logits[:, :self.vocab_size]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], top1: bool = False) -> SampleOutput:
        """(B, V) logits, row i for seqs[i] -> one token per row under each request's sampling (and, with
        `top1`, each row's top-1 probability for the routers when the batch is greedy)."""
        return self.sampler.sample(self.vocab_logits(logits), [s.sampling for s in seqs],
                                   [s.generator for s in seqs], top1)
