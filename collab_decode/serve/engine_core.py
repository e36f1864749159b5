"""The engine in a process of its own (as vLLM's EngineCore): the server's process keeps the event loop
and the network, the engine process builds the models and steps them on its main thread.

Why a process: in one process, the event loop's work for each token it streams (~0.1 ms of Python)
holds the GIL that the engine's own Python needs between its torch ops; measured on the demo pair at
concurrency 1, the server then delivered about half of the engine's tokens/s for the small model
(docs/benchmarks.md). Apart, the engine steps while the loop streams.

    server process: AsyncEngine's engine thread drives an EngineCoreClient as it would an Engine
        submit       --("add", seq id, prompt ids, sampling, routing)-->  Engine.add_request, between steps
                     <--("added", seq id, None | ValueError)---------    (read by a later step(): the
                                                                         caller goes on meanwhile)
        abort        --("abort", seq id)---------------------->    Engine.abort, between steps
                     <--("state", EngineState)-----------------    (so /metrics sees the blocks freed)
        step         <--("step", [CoreOutput], EngineState, [s])--  Engine.step, while it has work (the
                                                                    steps of up to STREAM_INTERVAL_S at once:
                                                                    one CoreOutput per sequence)
        close        --("stop")------------------------------->    exits
                     <--("state", EngineState)-----------------    every IDLE_REPORT_S while idle
    engine process: run_engine_core(build, conn): build (load, warm-up) -> ("ready", EngineInfo) -> loop

The client numbers the requests it sends and does not wait for the engine process's answer: a request that
arrives while the engine steps is sent at once and added when that step ends (waiting for each answer held
every request that came meanwhile back one more step). step() collects the answers (`answers`) with the
outputs; add_request waits for its own. The client mirrors each sequence's logprobs and counts from the outputs
(SeqMirror), so AsyncEngine reads a CoreOutput as it reads the Engine's RequestOutput. The builder must pickle
(a module-level function, or functools.partial of one): the engine process starts fresh (spawn), never forked
from a process that may hold threads.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

POLL_S = 0.002  # how long step() waits for the engine process before it returns nothing (commands go on)
# The engine process sends its outputs at most this often (and at once when a request starts or ends, or
# the engine goes idle; `serve --stream-interval-ms`): a send costs the engine ~0.1-0.2 ms at batch 1 here
# (the text of the tokens since the last, pickling, the pipe write, and the caches it leaves cold), which a small
# model's 0.5 ms step would otherwise pay every token. tools/engine_process_limits.py, the demo pair at batch 1,
# tokens/s of the engine process over the same engine in process (medians of 3 passes): at 5 ms, `small` 0.92
# and neural:0.7 0.93; at 20 ms, 1.02 and 0.98 (its loop outside the steps 0.029 -> 0.014 ms a token). A stream
# reader gets the tokens of 20 ms at once, 50 times a second (the first token at once); TTFT is unchanged.
STREAM_INTERVAL_S = 0.020
IDLE_REPORT_S = 1.0  # how often an idle engine process reports its state (for /health and /metrics)


class EngineCoreDied(RuntimeError):
    """The engine process is gone (it crashed or was killed)."""


@dataclass
class EngineState:
    """The engine's counts for metrics and /health, sent with every step."""

    num_waiting: int
    num_running: int
    kv_used: dict[str, int]  # pool -> blocks in use
    kv_total: dict[str, int]  # pool -> blocks
    unavailable: dict[str, str]  # model -> why it cannot serve now (Engine.unavailable_models)
    forwards: dict[str, int]  # model -> forwards so far (a large-model call shared by k requests is one)
    # pool -> (tokens of admitted sequences that looked for a cached prefix, of them found cached), so far
    prefix_cache: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, engine) -> "EngineState":
        if isinstance(engine, EngineCoreClient):
            return engine.state
        kv = engine.kv
        return cls(len(engine.scheduler.waiting), len(engine.scheduler.running),
                   {pool: m.num_used_blocks for pool, m in kv.items()},
                   {pool: m.pool.num_blocks for pool, m in kv.items()}, engine.unavailable_models(),
                   dict(engine.runner.num_forwards),
                   {pool: (m.num_queried_tokens, m.num_hit_tokens) for pool, m in kv.items() if m.prefix_caching})


@dataclass
class EngineInfo:
    """What the server reads of the engine, sent once the engine is built."""

    tokenizer: object
    max_model_len: int
    config: object  # EngineConfig
    models: list[str]  # "small" (and "large")


@dataclass
class CoreOutput:
    """One request's progress since the engine process last sent (one or more steps): a RequestOutput's
    fields, with only these tokens' logprobs. `seq` is the client's mirror of the sequence."""

    seq_id: int
    new_token_ids: list[int]
    new_text: str
    new_provenance: list[str]
    finished: bool
    finish_reason: str | None
    new_logprobs: list[float]
    new_top_logprobs: list
    prompt_logprobs: list | None  # with a request's first output, if it asked
    stats: dict  # SequenceStats.as_dict()
    error: str | None
    error_code: str | None
    queue_time_s: float | None = None  # Sequence.queue_time_s
    seq: "SeqMirror | None" = None


class _Stats:
    def __init__(self, values: dict):
        self.values = values

    def as_dict(self) -> dict:
        return self.values


@dataclass
class SeqMirror:
    """The fields of a Sequence that AsyncEngine reads, rebuilt from the outputs."""

    sampling: object
    num_prompt_tokens: int
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    stats: _Stats = field(default_factory=lambda: _Stats({}))
    error: str | None = None
    error_code: str | None = None
    queue_time_s: float | None = None

    def update(self, out: CoreOutput) -> None:
        self.logprobs += out.new_logprobs
        self.top_logprobs += out.new_top_logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.stats, self.error, self.error_code = _Stats(out.stats), out.error, out.error_code
        self.queue_time_s = out.queue_time_s


# ---- server side -----------------------------------------------------------------------------------
class EngineCoreClient:
    """Starts the engine process and speaks for it: AsyncEngine's engine thread calls submit, abort, step and
    has_unfinished as on an Engine (add_request: submit, and wait for the answer); the server reads tokenizer,
    max_model_len, config, backends, max_tokens_left and unavailable_models (from any thread). A reader
    thread takes every message off the pipe: steps and answers queue for step() in the order they came,
    states replace `state`."""

    def __init__(self, build: Callable, stream_interval_s: float = STREAM_INTERVAL_S):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # how many commands were sent, in memory both processes share: the engine process reads it between
        # steps (a load from memory) instead of asking the pipe (a system call every step)
        self._num_sent = ctx.RawValue("Q", 0)
        self._send_lock = threading.Lock()  # (commands are counted in the order they are written)
        self._process = ctx.Process(target=run_engine_core, args=(build, child, self._num_sent, stream_interval_s),
                                    name="collab-decode-engine", daemon=True)
        self._process.start()
        child.close()
        self._seqs: dict[int, SeqMirror] = {}  # sequences sent and not finished, refused or aborted
        self._ids = itertools.count()
        self.step_seconds: list[float] = []  # durations of the engine steps the last step() returned
        self.answers: list[tuple[int, Exception | None]] = []  # (seq id, its refusal or None) as they came
        self._outputs: list[CoreOutput] = []  # received, not yet returned by step()
        self._seconds: list[float] = []  # their steps' durations
        kind, *payload = self._recv()
        if kind == "failed":
            self._process.join(timeout=10)
            raise payload[0]
        info, self.state = payload  # EngineState: replaced as reports come
        self.tokenizer, self.max_model_len, self.config = info.tokenizer, info.max_model_len, info.config
        self.backends = dict.fromkeys(info.models)
        # ("step", outputs, seconds) and ("added", seq id, error) in the order they came; None once the pipe closed
        self._messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="collab-decode-engine-reader", daemon=True).start()

    def max_tokens_left(self, num_prompt_tokens: int) -> int:
        return max(1, self.max_model_len - num_prompt_tokens)

    def unavailable_models(self) -> dict[str, str]:
        return dict(self.state.unavailable)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def submit(self, prompt_ids: list[int], sampling, routing=None) -> int:
        """Send a request; returns its sequence id at once. The engine process adds it between two steps, and
        its answer (None, or the error that refused it: ValueError for the request's fault) comes in `answers`
        with a later step(), before any of its outputs."""
        seq_id = next(self._ids)
        self._seqs[seq_id] = SeqMirror(sampling, len(prompt_ids))
        self._send(("add", seq_id, prompt_ids, sampling, routing))
        return seq_id

    def add_request(self, prompt_ids: list[int], sampling, routing=None) -> int:
        """submit, and wait for the answer: the sequence id, or raise its refusal. Outputs that come meanwhile
        wait for the next step(); the answer is taken out of `answers`."""
        seq_id = self.submit(prompt_ids, sampling, routing)
        while True:
            for i, (answered, error) in enumerate(self.answers):
                if answered == seq_id:
                    del self.answers[i]
                    if error is not None:
                        raise error
                    return seq_id
            self._receive(block=True)

    def abort(self, seq_id: int) -> None:
        """Drop a sequence; the engine process frees its blocks before its next step (and reports it)."""
        if self._seqs.pop(seq_id, None) is not None:
            self._send(("abort", seq_id))

    def step(self) -> list[CoreOutput]:
        """The outputs of the engine's next step (or of every step already received), and the answers that came
        before them in `answers`; [] if nothing came within POLL_S, so the caller can pass on new requests and
        aborts meanwhile."""
        if not (self._outputs or self._seconds):
            self._receive(block=True, timeout=POLL_S)
        self._receive(block=False)
        outputs, self._outputs = self._outputs, []
        self.step_seconds, self._seconds = self._seconds, []
        return outputs

    def _receive(self, block: bool, timeout: float | None = None) -> None:
        """Take the messages that came (waiting up to `timeout` for one if `block`; None: as long as it takes)."""
        try:
            messages = [self._messages.get(block, timeout)]
        except queue.Empty:
            return
        while not self._messages.empty():
            messages.append(self._messages.get_nowait())
        for message in messages:
            if message is None:
                raise self._died()
            kind, *payload = message
            if kind == "added":
                seq_id, error = payload
                if error is not None:
                    self._seqs.pop(seq_id, None)
                self.answers.append((seq_id, error))
            else:
                step_outputs, seconds = payload
                self._seconds += seconds
                self._outputs += [out for out in step_outputs if self._mirror(out)]

    def _mirror(self, out: CoreOutput) -> bool:
        seq = self._seqs.get(out.seq_id)
        if seq is None:
            return False  # aborted here meanwhile
        seq.update(out)
        out.seq = seq
        if out.finished:
            del self._seqs[out.seq_id]
        return True

    def close(self) -> None:
        try:
            self._send(("stop",))
        except EngineCoreDied:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)

    def _read(self) -> None:
        while True:
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, OSError):
                self._messages.put(None)
                return
            if kind == "step":
                outputs, self.state, seconds = payload
                self._messages.put(("step", outputs, seconds))
            elif kind == "state":
                self.state = payload[0]
            else:
                self._messages.put((kind, *payload))

    def _died(self) -> EngineCoreDied:
        return EngineCoreDied(f"the engine process exited (code {self._process.exitcode})")

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                # counted before it is written: a message longer than the pipe's buffer is written only as the
                # engine process reads it, and that process reads only what the count announces
                self._num_sent.value += 1
                self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            raise self._died() from None

    def _recv(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None


# ---- engine process --------------------------------------------------------------------------------
def run_engine_core(build: Callable, conn, num_sent, stream_interval_s: float = STREAM_INTERVAL_S) -> None:
    """The engine process: build the engine, then apply commands between steps and send every step's
    outputs (at most every `stream_interval_s`), until told to stop or the server process is gone.
    `num_sent`: the client's count of the commands it sent (shared memory)."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    try:
        engine = build()
    except BaseException as e:
        conn.send(("failed", _picklable(e)))
        return
    conn.send(("ready", EngineInfo(engine.tokenizer, engine.max_model_len, engine.config, list(engine.backends)),
               EngineState.of(engine)))
    core = _Core(engine, conn, num_sent, stream_interval_s)
    try:
        with torch.inference_mode():  # once, not once a step (Engine.step)
            while core.apply(block=not engine.has_unfinished()):
                if engine.has_unfinished():
                    core.step()
    except (EOFError, BrokenPipeError, OSError):
        pass  # the server process is gone


class _Core:
    def __init__(self, engine, conn, num_sent, stream_interval_s: float):
        self.engine, self.conn, self.stream_interval_s = engine, conn, stream_interval_s
        # is a command waiting? The client counts each command as it starts writing it: a count past those
        # received means one is (being) written. (A poll of the pipe is a system call every step: 1.5-2% of a
        # small model's tokens/s at batch 1.)
        self.num_sent, self.num_received = num_sent, 0
        self.prompt_logprobs_sent: set[int] = set()
        # what each sequence did since the last send (see STREAM_INTERVAL_S): one CoreOutput per sequence,
        # however many steps it covers, so the message and the server's work grow with sequences, not steps
        self.pending: dict[int, CoreOutput] = {}
        self.pending_seqs: dict[int, object] = {}  # their Sequences (not sent)
        self.pending_seconds: list[float] = []  # the steps' durations
        self.last_sent = 0.0

    def apply(self, block: bool) -> bool:
        """Apply every command waiting (waiting for one if `block`, and reporting the engine's state every
        IDLE_REPORT_S meanwhile: a remote model's availability changes while nothing runs); False once
        told to stop."""
        while block or self.num_sent.value > self.num_received:
            while block and not self.conn.poll(IDLE_REPORT_S):
                self.conn.send(("state", EngineState.of(self.engine)))
            block = False
            kind, *payload = self.conn.recv()
            self.num_received += 1
            if kind == "stop":
                return False
            if kind == "abort":
                self.engine.abort(payload[0])
                self.prompt_logprobs_sent.discard(payload[0])
                self.conn.send(("state", EngineState.of(self.engine)))  # /metrics sees the blocks freed
                continue
            seq_id, *request = payload
            try:
                # text is detokenized when outputs are sent (below), a few tokens at a time
                self.engine.add_request(*request, stream_text=False, seq_id=seq_id)
                self.conn.send(("added", seq_id, None))
            except Exception as e:  # ValueError: the request's fault (HTTP 400); anything else is reported
                self.conn.send(("added", seq_id, _picklable(e)))
        return True

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        now = time.perf_counter()
        for out in outputs:
            self._add(out)
        self.pending_seconds.append(now - start)
        starts_or_ends = any(out.finished or out.seq.num_output_tokens == len(out.new_token_ids) for out in outputs)
        if now - self.last_sent >= self.stream_interval_s or starts_or_ends or not self.engine.has_unfinished():
            self._finish_pending()
            self.conn.send(("step", list(self.pending.values()), EngineState.of(self.engine), self.pending_seconds))
            self.pending, self.pending_seqs, self.pending_seconds, self.last_sent = {}, {}, [], now

    def _add(self, out) -> None:
        """Fold one step's output of a sequence into what it has pending."""
        seq, n = out.seq, len(out.new_token_ids)
        pending = self.pending.get(out.seq_id)
        if pending is None:
            prompt_logprobs = None
            if seq.sampling.prompt_logprobs is not None and out.seq_id not in self.prompt_logprobs_sent:
                self.prompt_logprobs_sent.add(out.seq_id)
                prompt_logprobs = list(seq.prompt_logprobs)
            pending = self.pending[out.seq_id] = CoreOutput(out.seq_id, [], "", [], False, None, [], [],
                                                            prompt_logprobs, {}, None, None)
            self.pending_seqs[out.seq_id] = seq
        pending.new_token_ids += out.new_token_ids
        pending.new_text += out.new_text
        pending.new_provenance += out.new_provenance
        if seq.logprobs:
            pending.new_logprobs += seq.logprobs[len(seq.logprobs) - n:]
        if seq.top_logprobs:
            pending.new_top_logprobs += seq.top_logprobs[len(seq.top_logprobs) - n:]
        pending.finished, pending.finish_reason = out.finished, out.finish_reason
        if out.finished:
            self.prompt_logprobs_sent.discard(out.seq_id)

    def _finish_pending(self) -> None:
        """Before a send: each sequence's counts and error as they are now, and for an unfinished one the text
        of its tokens not yet detokenized (the engine detokenizes these sequences only at their end or when a
        stop rule needs the text)."""
        for seq_id, out in self.pending.items():
            seq = self.pending_seqs[seq_id]
            if not out.finished:
                out.new_text += self.engine.output.flush_text(seq)
            out.stats, out.error, out.error_code = seq.stats.as_dict(), seq.error, seq.error_code
            out.queue_time_s = seq.queue_time_s


def _picklable(e: BaseException) -> BaseException:
    """`e` if it survives pickling, else a RuntimeError that says what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class EngineProcess:
    """A builder for AsyncEngine (or Server) that puts the engine in a process of its own: called (on the
    engine thread), it starts the engine process, which calls `build`, and returns its client. The engine
    process is spawned, so a script that starts one needs the usual `if __name__ == "__main__":` guard."""

    def __init__(self, build: Callable, stream_interval_s: float = STREAM_INTERVAL_S):
        self.build = build  # picklable: the engine process calls it
        self.stream_interval_s = stream_interval_s

    def __call__(self) -> EngineCoreClient:
        return EngineCoreClient(self.build, self.stream_interval_s)
