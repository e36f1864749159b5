"""What one timed run records, the same for the engine (in process) and a server (over the network).

    drive_engine(engine, workload, policy, batch_size) -> Measurement
    load.drive_server(...)                              -> Measurement

A run keeps `batch_size` (engine) or `concurrency` (server) requests in flight until `num_requests` are
done: a closed loop, so a batch-B engine run and a concurrency-B server run do the same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from collab_decode.bench.workload import Workload
from collab_decode.engine.config import EngineConfig


def timed_config(**fields) -> EngineConfig:
    """The engine settings of a timed run: no prefix cache. Runs repeat the same prompts (each policy, each
    repeat), so a cache would time its own hits, and favour whichever policy runs after the prompts were cached."""
    return EngineConfig(enable_prefix_caching=False, **fields)


@dataclass
class RequestResult:
    index: int  # which request of the workload
    text: str
    num_tokens: int  # output tokens
    num_large_tokens: int  # of those, written by the large model
    num_large_calls: int  # large-model forwards it took part in
    num_catchup_tokens: int  # tokens the large model caught up on (beyond the tokens it wrote)
    e2e_s: float  # sent -> last token
    ttft_s: float | None  # sent -> first token (None for a server run that did not stream)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if self.ttft_s is None or self.num_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)


@dataclass
class StepBreakdown:
    """Where an engine run's steps spent their time (Engine.last_step, summed)."""

    num_steps: int = 0
    small_forward_s: float = 0.0  # inside the small model's forwards (input preparation included)
    large_forward_s: float = 0.0  # inside the large model's forwards
    step_s: float = 0.0  # whole steps: forwards + scheduling, sampling, routing, commit, detokenizing
    route_s: float = 0.0  # the routers' decisions (part of the engine's own time)

    @property
    def engine_s(self) -> float:
        """The engine's own time: steps minus forwards."""
        return self.step_s - self.small_forward_s - self.large_forward_s


@dataclass
class Measurement:
    seconds: float  # wall time from the first request sent to the last token received
    results: list[RequestResult]
    steps: StepBreakdown | None = None  # engine runs
    client_cpu_s: float | None = None  # server runs: CPU the load generator itself used
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds

    @property
    def large_share(self) -> float:
        return sum(r.num_large_tokens for r in self.results) / max(1, self.num_tokens)

    def accuracy(self, workload: Workload) -> float:
        return sum(workload.is_correct(r.index, r.text) for r in self.results) / max(1, len(self.results))

    def percentiles_ms(self, name: str, qs=(50, 95)) -> list[float | None]:
        """Percentiles over requests of ttft_s / tpot_s / e2e_s, in ms (None where none was measured)."""
        values = [getattr(r, name) for r in self.results]
        values = [v for v in values if v is not None]
        if not values:
            return [None] * len(qs)
        return [round(1000 * float(np.percentile(values, q)), 3) for q in qs]


def drive_engine(engine, workload: Workload, policy: str, batch_size: int, num_requests: int,
                 progress=None) -> Measurement:
    """Run requests [0, num_requests) through `engine` with `batch_size` in flight; time every token."""
    sampling = workload.sampling()
    steps = StepBreakdown()
    sent, first, results = {}, {}, []
    in_flight: dict[int, int] = {}  # seq_id -> request index
    next_index = 0
    start = time.perf_counter()
    with torch.inference_mode():  # entered once around the loop, as the server's engine process and generate do
        while next_index < num_requests or in_flight:
            while next_index < num_requests and len(in_flight) < batch_size:
                seq_id = engine.add_request(workload.request(next_index), sampling, policy, stream_text=False)
                in_flight[seq_id] = next_index
                sent[next_index] = time.perf_counter()
                next_index += 1
            outputs = engine.step()
            now = time.perf_counter()
            _add_step(steps, engine.last_step)
            for out in outputs:
                i = in_flight.get(out.seq_id)
                if i is None:
                    continue
                if out.new_token_ids and i not in first:
                    first[i] = now
                if out.finished:
                    del in_flight[out.seq_id]
                    results.append(_result(i, out.seq, sent[i], first.get(i, now), now))
                    if progress:
                        progress(len(results))
    return Measurement(time.perf_counter() - start, sorted(results, key=lambda r: r.index), steps)


def _add_step(steps: StepBreakdown, last) -> None:
    steps.num_steps += 1
    steps.small_forward_s += last.small_forward
    steps.large_forward_s += last.large_forward
    steps.step_s += last.total
    steps.route_s += last.route


def _result(i: int, seq, sent: float, first: float, done: float) -> RequestResult:
    stats = seq.stats
    return RequestResult(index=i, text=seq.output_text, num_tokens=seq.num_output_tokens,
                         num_large_tokens=stats.num_large_tokens, num_large_calls=stats.num_large_calls,
                         num_catchup_tokens=stats.num_catchup_tokens, e2e_s=done - sent, ttft_s=first - sent)
