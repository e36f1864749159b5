"""Engine configuration, one frozen dataclass per concern, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from collab_decode.engine.scheduler import SchedulerConfig

MIB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    small_kv_bytes: int = 256 * MIB  # KV cache memory granted to the small model
    large_kv_bytes: int = 256 * MIB  # KV cache memory granted to the large model
    default_policy: str = "small"  # routing policy for requests that name none (see routing/)
    step_delimiter: str = "\n\n"  # what ends a reasoning step (step-level policies)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for name in ("small_kv_bytes", "large_kv_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
