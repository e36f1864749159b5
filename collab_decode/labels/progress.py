"""Progress of a stage on one stderr line, rewritten in place (`\\r`), with rates:

    [continuations] shard 3/10  812/1034 branches  98,210 tokens  2,310 tokens/s  42 s
"""

from __future__ import annotations

import sys
import time

MIN_INTERVAL_S = 0.25  # redraw at most this often


class Progress:
    def __init__(self, stage: str, num_shards: int, item: str, enabled: bool = True, stream=None):
        self.stage = stage
        self.num_shards = num_shards
        self.item = item  # what is counted: traces, branches, positions...
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.shard = 0  # 1-based number of the shard being worked on
        self.num_items = self.total_items = self.num_tokens = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def start_shard(self, total_items: int) -> None:
        self.shard += 1
        self.num_items, self.total_items = 0, total_items
        self.draw(force=True)

    def add(self, num_items: int = 0, num_tokens: int = 0) -> None:
        self.num_items += num_items
        self.num_tokens += num_tokens
        self.draw()

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last_draw < MIN_INTERVAL_S):
            return
        self._last_draw = now
        elapsed = now - self.start
        rate = f"  {self.num_tokens / elapsed:,.0f} tokens/s" if self.num_tokens and elapsed > 0 else ""
        line = (f"[{self.stage}] shard {self.shard}/{self.num_shards}  {self.num_items}/{self.total_items} "
                f"{self.item}  {self.num_tokens:,} tokens{rate}  {elapsed:.0f} s")
        self.stream.write("\r" + line.ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.shard:
            self.draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
