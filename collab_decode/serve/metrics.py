"""Prometheus metrics of one server, in their own registry (so several servers can share a process).

The engine thread sets the gauges that describe the engine (queue depth, KV blocks in use); the
asyncio side counts requests and tokens and observes latencies as outputs arrive.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the REST layer)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# a token's time: from the small model alone on a CPU (~0.5 ms) to the large model under load
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SHARE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("collab_decode_requests", "Requests by outcome: stop, length, abort (client went "
                                "away), invalid (400), busy (429), unauthorized (401), error", ["outcome"], registry=r)
        self.prompt_tokens = Counter("collab_decode_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("collab_decode_generation_tokens", "Output tokens by the model that wrote "
                                         "them", ["model"], registry=r)
        self.large_share = Gauge("collab_decode_large_share", "Fraction of all output tokens so far written by "
                                 "the large model", registry=r)
        self.request_large_share = Histogram("collab_decode_request_large_share", "Large share per finished "
                                             "request", buckets=_SHARE_BUCKETS, registry=r)
        self.forwards = Counter("collab_decode_model_forwards", "Forwards of each model (a large-model call that "
                                "several requests share is one)", ["model"], registry=r)
        self.large_calls = Counter("collab_decode_large_calls", "Large-model calls of finished requests, summed "
                                   "over them (usage.large_calls: a call shared by k requests counts k times)",
                                   registry=r)
        self.large_waits = Counter("collab_decode_large_waits", "Steps that finished requests' routed tokens waited "
                                   "to share a large-model call (--large-wait-steps)", registry=r)
        self.in_flight = Gauge("collab_decode_requests_in_flight", "Requests admitted and not yet finished "
                               "(bounded by --max-queue)", registry=r)
        self.waiting = Gauge("collab_decode_requests_waiting", "Requests queued in the engine's scheduler", registry=r)
        self.running = Gauge("collab_decode_requests_running", "Requests the engine is decoding", registry=r)
        self.kv_blocks_used = Gauge("collab_decode_kv_blocks_used", "KV-cache blocks in use", ["pool"], registry=r)
        self.kv_blocks_total = Gauge("collab_decode_kv_blocks_total", "KV-cache blocks in the pool", ["pool"],
                                     registry=r)
        self.prefix_cache_queries = Counter("collab_decode_prefix_cache_queries", "Tokens of admitted requests "
                                            "looked up in each pool's prefix cache", ["pool"], registry=r)
        self.prefix_cache_hits = Counter("collab_decode_prefix_cache_hits", "Of them, tokens found cached (their "
                                         "K/V not computed again)", ["pool"], registry=r)
        self.model_available = Gauge("collab_decode_model_available", "1 while a model can serve, 0 while it "
                                     "cannot (a remote large model whose endpoint is down)", ["model"], registry=r)
        self.ttft = Histogram("collab_decode_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("collab_decode_request_latency_seconds", "Arrival to last output token of "
                             "finished requests", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("collab_decode_time_per_output_token_seconds", "Per finished request of two or more "
                              "output tokens: first to last output token over the tokens after the first (TPOT)",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.queue_time = Histogram("collab_decode_request_queue_time_seconds", "Per finished request: from the "
                                    "engine taking it to its first admission to a batch (waiting for a slot or KV "
                                    "blocks)", buckets=_LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("collab_decode_engine_step_seconds", "Duration of one engine step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self._num_small = self._num_large = 0
        self._totals: dict[tuple, int] = {}  # the engine's running totals at the last report, by counter and label

    def count_tokens(self, provenance: list[str]) -> None:
        """Count a delta's output tokens by model and update the overall large share."""
        num_large = sum(1 for p in provenance if p == "large")
        num_small = len(provenance) - num_large
        if num_small:
            self.generation_tokens.labels("small").inc(num_small)
        if num_large:
            self.generation_tokens.labels("large").inc(num_large)
        self._num_small += num_small
        self._num_large += num_large
        total = self._num_small + self._num_large
        if total:
            self.large_share.set(self._num_large / total)

    def set_engine_state(self, engine) -> None:
        """Queue depth and KV use; engine thread only (reads the engine, or the engine process's last report)."""
        from collab_decode.serve.engine_core import EngineState

        state = EngineState.of(engine)
        self.waiting.set(state.num_waiting)
        self.running.set(state.num_running)
        for pool, used in state.kv_used.items():
            self.kv_blocks_used.labels(pool).set(used)
            self.kv_blocks_total.labels(pool).set(state.kv_total[pool])
        for model, count in state.forwards.items():
            self._advance(self.forwards.labels(model), ("forwards", model), count)
        for pool, (queried, hit) in state.prefix_cache.items():
            self._advance(self.prefix_cache_queries.labels(pool), ("queries", pool), queried)
            self._advance(self.prefix_cache_hits.labels(pool), ("hits", pool), hit)

    def _advance(self, counter, key: tuple, total: int) -> None:
        """Bring a counter to the engine's running total (the engine counts; a counter only goes up)."""
        new = total - self._totals.get(key, 0)
        if new > 0:
            counter.inc(new)
        self._totals[key] = total


    def watch_models(self, engine) -> None:
        """collab_decode_model_available reads the engine's models at each scrape (thread-safe state only)."""
        for model in engine.backends:
            self.model_available.labels(model).set_function(lambda m=model: m not in engine.unavailable_models())

    def render(self) -> bytes:
        return generate_latest(self.registry)
