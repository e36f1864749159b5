"""Engine configuration, one frozen dataclass per concern, validated on construction.

Each field's `help` metadata is the documentation of its command-line flag (engine/args.py derives the
flags from these dataclasses); `unit` scales a flag's value into the field's (memory flags are in MiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collab_decode.engine.scheduler import SchedulerConfig

MIB = 1 << 20


def _doc(help: str, unit: int | None = None) -> dict:
    return {"help": help, "unit": unit}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = field(default=16, metadata=_doc("tokens per KV-cache block"))
    small_kv_bytes: int = field(default=256 * MIB, metadata=_doc("KV-cache memory for the small model", MIB))
    large_kv_bytes: int = field(default=256 * MIB, metadata=_doc("KV-cache memory for the large model", MIB))
    default_policy: str = field(default="small", metadata=_doc(
        "routing policy for requests that name none: small | large | random:p | entropy:t | confidence:t | "
        "step-entropy:t | neural[:NAME][:t] | speculative:k"))
    step_delimiter: str = field(default="\n\n", metadata=_doc("text that ends a reasoning step (step-level policies)"))
    chunk_threads: int = field(default=0, metadata=_doc(
        "torch threads for a large-model forward of at least 8 new tokens (its catch-up, a prompt) while at "
        "most --chunk-threads-max-batch sequences run; 0: the same threads as every other forward"))
    chunk_threads_max_batch: int = field(default=4, metadata=_doc(
        "the most running sequences at which a chunk gets --chunk-threads (more: the engine's batches and the "
        "server's own work keep every core busy)"))
    large_wait_steps: int = field(default=0, metadata=_doc(
        "most engine steps a routed token may wait for other routed tokens to share its large-model call, while "
        "at least --large-wait-min-batch sequences run (a large call costs nearly the same for a few sequences "
        "as for one: a GPU's, or a CPU's fixed cost per call; not a remote large model's, one request per "
        "sequence); 0: every routed token runs at once"))
    large_wait_min_batch: int = field(default=16, metadata=_doc(
        "the fewest running sequences at which a routed token waits (--large-wait-steps); fewer: none waits"))
    enable_prefix_caching: bool = field(default=True, metadata=_doc(
        "keep the K/V of full blocks of tokens after their requests end and reuse it for requests whose tokens "
        "begin the same (a shared system prompt, few-shot examples, earlier turns of a chat, n > 1, a "
        "preempted request's recompute); not for the model scoring a prompt_logprobs request's prompt"))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for name in ("small_kv_bytes", "large_kv_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.chunk_threads < 0 or self.chunk_threads_max_batch < 1:
            raise ValueError(f"chunk_threads must be >= 0 and chunk_threads_max_batch >= 1, got "
                             f"{self.chunk_threads} and {self.chunk_threads_max_batch}")
        if self.large_wait_steps < 0 or self.large_wait_min_batch < 1:
            raise ValueError(f"large_wait_steps must be >= 0 and large_wait_min_batch >= 1, got "
                             f"{self.large_wait_steps} and {self.large_wait_min_batch}")
        if self.large_wait_steps and self.large_wait_min_batch > self.scheduler.max_num_seqs:
            raise ValueError(f"large_wait_min_batch ({self.large_wait_min_batch}) is above max_num_seqs "
                             f"({self.scheduler.max_num_seqs}): no routed token would ever wait")
        if not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
