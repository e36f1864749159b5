"""The mutations the test suite must catch: each one a plausible bug in the core, written as an exact text
replacement in one file, with the tests meant to catch it. When the source changes so that a mutation's
`old` text no longer occurs exactly once, the runner stops and names it: update the entry, don't drop it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    id: str
    area: str  # routing | catch-up | scheduler | kv | speculative | stop | abort | serve | sampling | isolation | speed
    file: str  # relative to the repository root
    old: str  # text that occurs exactly once in `file`
    new: str  # what it becomes
    tests: tuple[str, ...]  # pytest node ids / files run against the mutated copy
    why: str  # the bug it stands for


ENGINE = "collab_decode/engine/engine.py"
OUTPUT = "collab_decode/engine/output.py"
POLICIES = "collab_decode/routing/policies.py"
SCHEDULER = "collab_decode/engine/scheduler.py"
SPECULATIVE = "collab_decode/engine/speculative.py"
SAMPLING = "collab_decode/sampling.py"
REFERENCE = "tests/engine/test_reference.py"
SCHED_TESTS = "tests/engine/test_scheduler.py"
ENGINE_TESTS = "tests/engine/test_engine.py"
SPEC_TESTS = "tests/engine/test_speculative.py"
OUTPUT_TESTS = "tests/engine/test_output.py"
KV_TESTS = ("tests/kvcache",)
SAMPLING_TESTS = "tests/test_sampling.py"
ISOLATION_TESTS = "tests/engine/test_isolation.py"
ASYNC_ENGINE = "collab_decode/serve/async_engine.py"
SERVE_CANCEL_TESTS = "tests/serve/test_async_engine.py"

MUTATIONS: list[Mutation] = [
    # ---- routing rules -----------------------------------------------------------------------------
    Mutation("entropy-flipped", "routing", POLICIES,
             "[h > self.t for h in entropy(", "[h < self.t for h in entropy(",
             (REFERENCE,), "the entropy rule routes the confident tokens instead of the uncertain ones"),
    Mutation("confidence-flipped", "routing", POLICIES,
             "[p < self.t for p in top1_prob(", "[p > self.t for p in top1_prob(",
             (REFERENCE,), "the confidence rule routes the confident tokens"),
    Mutation("entropy-sign", "routing", POLICIES,
             "return -torch.linalg.vecdot(logp.exp(), logp)", "return torch.linalg.vecdot(logp.exp(), logp)",
             (REFERENCE,), "entropy computed with the wrong sign (never routes)"),
    Mutation("neural-threshold-flipped", "routing", "collab_decode/routing/neural.py",
             "routed[i] = z > self._logit_threshold", "routed[i] = z < self._logit_threshold",
             ("tests/trainer/test_train.py",), "the neural router routes where its score is below the threshold"),
    Mutation("neural-gate-flipped", "routing", "collab_decode/routing/neural.py",
             "if m * self.gate > 1.0]", "if m * self.gate < 1.0]",
             ("tests/trainer/test_train.py",), "from 16 rows the gate scores the sure rows, skips the uncertain"),
    Mutation("random-flipped", "routing", POLICIES,
             "return torch.tensor(draws) < self.p", "return torch.tensor(draws) >= self.p",
             (REFERENCE,), "random routing at 1 - p instead of p"),
    Mutation("step-first-token-small", "routing", ENGINE,
             "proposals[seq.seq_id].routed = routed", 'proposals[seq.seq_id].routed = routed and seq.mode == "token"',
             (REFERENCE,), "the first token of a large-owned step is written by the small model"),
    Mutation("step-every-token", "routing", OUTPUT,
             "if step_mode and self._ends_step(seq):", "if step_mode:",
             (REFERENCE,), "step-level routing decides at every token (steps never last)"),
    # ---- catch-up -----------------------------------------------------------------------------------
    Mutation("large-skips-catchup", "catch-up", ENGINE,
             "        backlogs = [s.num_tokens - s.num_cached[LARGE] for s in seqs]",
             "        for s in routed:\n"
             "            if s.num_cached[LARGE]:\n"
             "                s.num_cached[LARGE] = s.num_tokens - 1\n"
             "        backlogs = [s.num_tokens - s.num_cached[LARGE] for s in seqs]",
             (REFERENCE,), "the large model skips its catch-up once it holds any cache (writes from a stale KV)"),
    Mutation("backend-error-fails-the-batch", "catch-up", ENGINE,
             "            return [self.output.fail(s, upstream_error(e.errors[s.seq_id])) for s in seqs if s.seq_id in "
             "e.errors]",
             "            return [self.output.fail(s, upstream_error(str(e))) for s in seqs]",
             ("tests/backends/test_backend_errors.py",),
             "a large model's error for some sequences (its endpoint refused them) ends every routed request"),
    Mutation("small-skips-catchup", "catch-up", SCHEDULER,
             "        num_new = min(seq.num_tokens - seq.num_cached[SMALL], budget)",
             "        if seq.num_output_tokens and seq.num_cached[SMALL]:\n"
             "            seq.num_cached[SMALL] = seq.num_tokens - 1\n"
             "        num_new = min(seq.num_tokens - seq.num_cached[SMALL], budget)",
             (REFERENCE,), "the small model skips catching up on tokens the large model wrote (step mode)"),
    # ---- threads and weight layout (speed paths that must not change a result) ----------------------
    Mutation("chunk-threads-not-restored", "speed", "collab_decode/engine/runner.py",
             "            torch.set_num_threads(threads)\n", "            pass\n",
             ("tests/engine/test_engine.py::test_long_chunks_take_chunk_threads_at_low_load",),
             "a long chunk's threads stay on for every later forward (decode steps contend with the server)"),
    Mutation("chunk-threads-for-the-small-model", "speed", "collab_decode/engine/runner.py",
             "if self.chunk_threads and model != SMALL and sum(num_new)", "if self.chunk_threads and sum(num_new)",
             ("tests/engine/test_engine.py::test_long_chunks_take_chunk_threads_at_low_load",),
             "the small model's prompts take the extra threads too (no faster; behind the server, slower)"),
    Mutation("chunk-threads-at-any-load", "speed", ENGINE,
             "low_load = len(self.scheduler.running) <= self.config.chunk_threads_max_batch",
             "low_load = True",
             ("tests/engine/test_engine.py::test_long_chunks_take_chunk_threads_at_low_load",),
             "chunks take the extra threads however many sequences run"),
    Mutation("packed-weight-read-unpacked", "speed", "collab_decode/models/layers.py",
             "            y = torch.mm(x, self.weight.t())  # (rows, out)",
             "            y = torch.mm(x, self.weight.t().contiguous().view(self.weight.shape).t())  # (rows, out)",
             ("tests/models/test_loader.py::test_loaded_linears_are_packed_except_a_tied_output_layer",
              "tests/models/test_parity.py"),
             "a packed weight's memory read as if it were (out, in): every product wrong"),
    # ---- scheduler: admission, budget, preemption ---------------------------------------------------
    Mutation("admission-ignores-pools", "scheduler", SCHEDULER,
             "if not all(self.kv[m].can_allocate(seq.seq_id, seq.num_tokens + 1) for m in self._pools_of(seq)):",
             "if False:",
             (SCHED_TESTS,), "requests are admitted whether or not the pools can take them"),
    Mutation("admission-ignores-large-pool", "scheduler", SCHEDULER,
             'return pools + ([LARGE] if seq.uses_large and LARGE in self.kv else [])',
             "return pools",
             (SCHED_TESTS,), "admission checks only the small model's pool"),
    Mutation("max-num-seqs-ignored", "scheduler", SCHEDULER,
             "while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:",
             "while self.waiting and budget > 0:",
             (SCHED_TESTS,), "the batch grows past max_num_seqs"),
    Mutation("token-budget-ignored", "scheduler", SCHEDULER,
             "        num_new = min(seq.num_tokens - seq.num_cached[SMALL], budget)",
             "        num_new = seq.num_tokens - seq.num_cached[SMALL]",
             (SCHED_TESTS,), "long prompts prefill at once, past the step's token budget"),
    Mutation("preempt-oldest", "scheduler", SCHEDULER,
             "victim = max(holders + [seq], key=lambda s: s.arrival)",
             "victim = min(holders + [seq], key=lambda s: s.arrival)",
             (SCHED_TESTS,), "preemption takes the oldest sequence instead of the youngest"),
    Mutation("preempt-any-pool", "scheduler", SCHEDULER,
             "if s is not seq and manager.has(s.seq_id) and manager.num_tokens_capacity(s.seq_id) > 0]",
             "if s is not seq]",
             (SCHED_TESTS,), "a shortage in one pool preempts sequences that hold nothing in it"),
    Mutation("preempt-keeps-cache-counts", "scheduler", "collab_decode/engine/sequence.py",
             "        self.num_cached = {SMALL: 0, LARGE: 0}\n        self.status = Status.WAITING",
             "        self.status = Status.WAITING",
             (SCHED_TESTS, REFERENCE), "a preempted sequence believes its caches still hold its tokens"),
    Mutation("preempt-requeued-last", "scheduler", SCHEDULER,
             "self.waiting.appendleft(seq)", "self.waiting.append(seq)",
             (SCHED_TESTS,), "a preempted sequence loses its place to requests that arrived after it"),
    # ---- KV blocks ----------------------------------------------------------------------------------
    Mutation("pool-never-returns", "kv", "collab_decode/kvcache/block_pool.py",
             "                self._free_ids.append(block_id)", "                pass",
             KV_TESTS + (ENGINE_TESTS,), "freed blocks never return to the free list"),
    Mutation("truncate-leaks", "kv", "collab_decode/kvcache/manager.py",
             "        self.pool.free(reversed(table[num_keep:]))\n", "",
             KV_TESTS + (ENGINE_TESTS,), "a rollback drops blocks from the table without freeing them"),
    Mutation("free-forgets-nothing", "kv", "collab_decode/kvcache/manager.py",
             "table = self._tables.pop(seq_id, None)", "table = None",
             KV_TESTS + (ENGINE_TESTS,), "a finished sequence keeps its blocks"),
    Mutation("blocks-needed-floor", "kv", "collab_decode/kvcache/manager.py",
             "return max(0, _ceil_div(num_tokens, self.block_size) - num_held)",
             "return max(0, num_tokens // self.block_size - num_held)",
             KV_TESTS + (ENGINE_TESTS,), "a partial last block is not allocated"),
    Mutation("pool-off-by-one", "kv", "collab_decode/kvcache/block_pool.py",
             "return 0 <= num_blocks <= len(self._free_ids)", "return 0 <= num_blocks < len(self._free_ids)",
             KV_TESTS, "the last free block can never be allocated"),
    # ---- speculative ---------------------------------------------------------------------------------
    Mutation("spec-greedy-accepts-all", "speculative", SPECULATIVE,
             "if d != t), len(drafts))", "if False), len(drafts))",
             (SPEC_TESTS,), "greedy verification keeps every draft"),
    Mutation("spec-bonus-from-last-draft", "speculative", SPECULATIVE,
             "p[len(drafts)], 1, generator", "p[len(drafts) - 1], 1, generator",
             (SPEC_TESTS,), "the bonus token is drawn from the last draft position's distribution"),
    Mutation("spec-sampled-accepts-all", "speculative", SPECULATIVE,
             "if ratio >= 1 or float(torch.rand((), generator=seq.generator, device=p.device)) < ratio:",
             "if True:",
             (SPEC_TESTS,), "sampled verification keeps every draft (output follows the small model)"),
    Mutation("spec-residual-is-p", "speculative", SPECULATIVE,
             "residual = (p[i] - q[i]).clamp_min(0)", "residual = p[i]",
             (SPEC_TESTS,), "a rejected draft is resampled from p instead of max(0, p - q)"),
    Mutation("spec-rollback-off-by-one", "speculative", SPECULATIVE,
             "n0 + min(num_new, num_kept)))", "n0 + min(num_new, num_kept) + 1))",
             (SPEC_TESTS,), "rollback keeps one cache entry too many (a token never fed)"),
    Mutation("spec-commits-past-stop", "speculative", SPECULATIVE,
             "        if output.stop_reason(seq) is not None:\n            break\n", "        pass\n",
             (SPEC_TESTS,), "tokens after an accepted EOS or stop token are committed"),
    # ---- stop handling -------------------------------------------------------------------------------
    Mutation("held-back-never-released", "stop", OUTPUT,
             "elif stops and not final:", "elif stops:",
             (OUTPUT_TESTS,), "text held back for a possible stop string is never released at the end"),
    Mutation("stop-string-kept", "stop", OUTPUT,
             "            text = text[:stop_at]", "            text = text[:stop_at + 1]",
             (OUTPUT_TESTS,), "the output keeps the first character of the stop string"),
    Mutation("stop-token-ids-ignored", "stop", OUTPUT,
             " or last in seq.sampling.stop_token_ids:", ":",
             (OUTPUT_TESTS,), "stop_token_ids never end a request"),
    Mutation("eos-inverted", "stop", OUTPUT,
             "if (last in self.eos_token_ids and not seq.sampling.ignore_eos)",
             "if (last in self.eos_token_ids and seq.sampling.ignore_eos)",
             (OUTPUT_TESTS, "tests/demo/test_checkpoints.py"), "EOS ends requests only when told to ignore it"),
    Mutation("max-tokens-off-by-one", "stop", OUTPUT,
             "seq.num_output_tokens >= seq.sampling.max_tokens", "seq.num_output_tokens > seq.sampling.max_tokens",
             (ENGINE_TESTS,), "one token more than max_tokens"),
    Mutation("stop-string-across-tokens", "stop", SAMPLING,
             "index = text_so_far.find(s, max(0, new_text_start - (len(s) - 1)))",
             "index = text_so_far.find(s, new_text_start)",
             (SAMPLING_TESTS, OUTPUT_TESTS), "a stop string split across two tokens is missed"),
    Mutation("stop-strings-only-at-the-end", "stop", OUTPUT,
             "if reason is not None or seq.stream_text or seq.sampling.stop or",
             "if reason is not None or seq.stream_text or",
             (OUTPUT_TESTS,), "a request that does not stream text (generate, the engine process) checks its stop "
                              "strings only once it ends: it runs past them"),
    Mutation("step-ends-unseen-without-text", "stop", OUTPUT,
             " or seq.sampling.stop or step_mode:", " or seq.sampling.stop:",
             ("tests/engine/test_routing.py",), "step routing without streamed text never sees a step end: the first "
                                                "step's owner writes the whole answer"),
    Mutation("engine-process-text-only-at-the-end", "serve", "collab_decode/serve/engine_core.py",
             "                out.new_text += self.engine.output.flush_text(seq)", "                pass",
             ("tests/serve/test_engine_process.py",), "the engine process sends a request's text only with its last "
                                                      "output: a stream shows nothing until the end"),
    # ---- abort paths ---------------------------------------------------------------------------------
    Mutation("engine-abort-keeps-blocks", "abort", ENGINE,
             '            self._finish(seq, "abort")',
             "            self.seqs.pop(seq_id)",
             (ENGINE_TESTS,), "an aborted sequence keeps its blocks and its place in the batch"),
    Mutation("abort-never-submitted", "abort", ASYNC_ENGINE,
             '            self._submit(("abort", request))', "            pass",
             (SERVE_CANCEL_TESTS,), "a cancelled request is forgotten on the async side and never reaches the engine"),
    Mutation("engine-thread-skips-abort", "abort", ASYNC_ENGINE,
             "            self.engine.abort(request.seq_id)", "            pass",
             (SERVE_CANCEL_TESTS,), "the engine thread drops its record of a cancelled request but keeps decoding it"),
    Mutation("metrics-miss-large-tokens", "serve", "collab_decode/serve/metrics.py",
             'num_large = sum(1 for p in provenance if p == "large")', "num_large = 0",
             ("tests/serve/test_metrics.py",), "/metrics counts no large-model tokens (disagrees with usage)"),
    Mutation("cancel-swallowed-with-a-delta", "abort", ASYNC_ENGINE,
             "            return await wait_for(self._request.outputs.get(), left)",
             "            return await asyncio.wait_for(self._request.outputs.get(), left)",
             (SERVE_CANCEL_TESTS,), "a client's cancel landing with a delta is dropped (Python 3.11's wait_for): "
             "the handler waits on and the engine decodes on"),
    Mutation("dropped-stream-not-aborted", "abort", ASYNC_ENGINE,
             "        weakref.finalize(self, engine._abandon, request)\n", "",
             ("tests/serve/test_async_engine.py",), "a stream dropped without reading it to the end decodes on"),
    # ---- server hardening (limits, connections, auth) -------------------------------------------------
    Mutation("chunked-body-uncounted", "serve", "collab_decode/serve/http_guard.py",
             "            if num_bytes > self.max_body_bytes:", "            if False:",
             ("tests/serve/test_limits.py",), "a chunked body without Content-Length is read whatever its size"),
    Mutation("tokenize-on-the-loop", "serve", "collab_decode/serve/limits.py",
             "        if len(text) < INLINE_TOKENIZE_CHARS:", "        if True:",
             ("tests/serve/test_connections.py",), "a megabyte prompt is tokenized on the event loop: /health stalls"),
    Mutation("no-header-timeout", "serve", "collab_decode/serve/http_guard.py",
             "            if self._awaiting_headers() and not self.transport.is_closing():\n"
             "                self.transport.close()",
             "            pass",
             ("tests/serve/test_connections.py",), "a client that never finishes its headers holds its connection"),
    Mutation("bare-api-key-accepted", "serve", "collab_decode/serve/requests.py",
             'return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())',
             "return hmac.compare_digest(authorization.removeprefix('Bearer ').strip().encode(), api_key.encode())",
             ("tests/serve/test_auth.py",), "a key sent without the Bearer scheme is accepted"),
    Mutation("no-drain", "serve", "collab_decode/serve/server.py",
             "        await self.drain(self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)\n",
             "", ("tests/serve/test_drain.py",), "SIGTERM cuts the requests in flight at once and takes new ones"),
    Mutation("request-timeout-ignored", "serve", ASYNC_ENGINE,
             "        if not timeout_s:\n", "        if True:\n",
             ("tests/serve/test_limits.py",), "a request runs past the request timeout, holding its KV blocks"),
    Mutation("prompt-scored-by-whoever-prefills", "serve", "collab_decode/engine/sequence.py",
             "return LARGE if self.uses_large else SMALL", "return SMALL if self.router is not None else LARGE",
             ("tests/backends/test_prompt_logprobs.py",),
             "echo/prompt logprobs of a routed request come from the small model that prefilled, not the large one"),
    Mutation("echo-only-keeps-its-token", "serve", "collab_decode/serve/openai_api.py",
             "trim = without_output if req.echo_only else None", "trim = None",
             ("tests/serve/test_openai_batch.py",),
             "echo with max_tokens 0 answers the token generated to score the prompt (lm-eval reads it as prompt)"),
    Mutation("seeded-choices-share-a-seed", "serve", "collab_decode/serve/requests.py",
             "return [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(n)]",
             "return [sampling] * n",
             ("tests/serve/test_openai_batch.py",), "n seeded choices all draw the same sample"),
    Mutation("health-check-unparsed", "serve", "collab_decode/serve/grpc_server.py",
             "await _check_parsed(request, context)\n        return await health_service.Check(",
             "return await health_service.Check(",
             ("tests/serve/test_grpc_fuzz.py",),
             "a health check whose bytes do not parse answers UNKNOWN, quoting the parser's exception"),
    Mutation("grpc-n-past-queue-retryable", "serve", "collab_decode/serve/grpc_server.py",
             "if request.n > self.engine.max_queue:", "if False:",
             ("tests/serve/test_grpc_fuzz.py",),
             "n past max_queue is RESOURCE_EXHAUSTED (clients retry) though it can never be admitted"),
    Mutation("error-statuses-undocumented", "serve", "collab_decode/serve/openai_api.py",
             "**_errors(400, 401, 408, 413, 429, 500, 503, 504)}", "**_errors(401, 408, 413, 429, 500, 503, 504)}",
             ("tests/serve/test_fuzz.py",), "the OpenAPI schema does not document the 400 every bad request gets"),
    Mutation("model-fault-retryable", "serve", ASYNC_ENGINE,
             "        return self.code in (MODEL_ERROR, INTERNAL_ERROR)", "        return False",
             ("tests/serve/test_isolation.py",), "a request the server cannot compute (NaN logits, a router that "
                                                 "raises) answers 503, telling the client to retry what cannot pass"),
    Mutation("lookup-context-one-behind", "routing", "collab_decode/routing/neural.py",
             "lookup_features(state.index, seq.token_ids[-LOOKUP_MAX_N:], ids, probs)",
             "lookup_features(state.index, seq.token_ids[-LOOKUP_MAX_N - 1:-1], ids, probs)",
             ("tests/labels/test_online_features.py",), "the online router looks up the context one token behind "
                                                        "the one its training rows used"),
    Mutation("lookup-ignores-the-longest-match", "routing", "collab_decode/routing/features.py",
             "for n in range(min(LOOKUP_MAX_N, len(context)), 0, -1):",
             "for n in range(1, min(LOOKUP_MAX_N, len(context)) + 1):",
             ("tests/trainer/test_train.py",), "the prompt lookup takes the shortest suffix the prompt holds"),
    # ---- sampling filters ----------------------------------------------------------------------------
    Mutation("temperature-ignored", "sampling", SAMPLING,
             "scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]",
             "scaled = logits - logits.amax(dim=-1, keepdim=True)",
             (SAMPLING_TESTS,), "temperature has no effect"),
    Mutation("top-k-ignored", "sampling", SAMPLING,
             "keep = rank[None, :] < top_k[:, None]", "keep = rank[None, :] >= 0",
             (SAMPLING_TESTS,), "top_k keeps every token"),
    Mutation("top-p-ignored", "sampling", SAMPLING,
             "keep &= in_nucleus\n", "",
             (SAMPLING_TESTS,), "top_p keeps every token"),
    Mutation("seed-ignored", "sampling", SAMPLING,
             "noise[row].exponential_(generator=generator)", "noise[row].exponential_()",
             (SAMPLING_TESTS,), "a request's seed does not make its draws reproducible"),
    # ---- isolation: one request's failure is its own -------------------------------------------------
    Mutation("nan-logits-sampled", "isolation", SAMPLING,
             "        out.row_max = row_max\n", "",
             (ISOLATION_TESTS, SAMPLING_TESTS), "NaN logits give a token (the NaN's index) instead of failing"),
    Mutation("failed-blocks-not-cleared", "isolation", ENGINE,
             "            self._clear_blocks(seq)", "            pass",
             (ISOLATION_TESTS,), "a failed request's NaN K/V stays in the blocks the next requests get"),
    Mutation("decode-padded-with-block-0", "isolation", "collab_decode/backends/native.py",
             "table + table[-1:] * (num_blocks - len(table))", "table + [0] * (num_blocks - len(table))",
             ("tests/models/test_parity.py::test_decode_padding_never_reads_another_sequences_blocks",),
             "short decode tables padded with another sequence's block: its NaN reaches the batch"),
    Mutation("router-error-fails-the-step", "isolation", ENGINE,
             '            log.exception("router %s raised on a batch of %d sequences; asking each alone", '
             "type(router).__name__,\n                          len(rows))",
             "            raise",
             (ISOLATION_TESTS,), "a router that raises on one sequence fails every request of the step"),
    Mutation("commit-error-fails-the-step", "isolation", ENGINE,
             '            log.exception("committing a token of sequence %d failed: that request fails", p.seq.seq_id)',
             "            raise",
             (ISOLATION_TESTS,), "an error while committing one sequence's token fails every request of the step"),
]
