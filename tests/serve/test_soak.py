"""The soak's short form (tools/soak.py; the long one is `make soak`): 8 clients for 45 s against a real
`collab-decode serve --pair demo` (engine process), REST and gRPC, streaming and not, mixed policies, random
cancellations and hostile requests. Asserts correctness only (speed is printed, never judged): no
unexpected failure (innocent requests succeed, hostile ones get their 4xx / gRPC status), no stuck client,
every KV block free once idle, nothing in the server's log, RSS not growing without bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "tools" / "soak.py"
RSS_MARGIN_MIB = 256  # generous: over 45 s the processes grow by a few MiB at most


def test_short_soak(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--seconds", "45", "--clients", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0, summary["failure_examples"]
    assert summary["stuck_clients"] == 0
    assert summary["innocent"] > 0 and summary["hostile"] > 0 and summary["cancelled"] > 0, summary["by_kind"]
    assert not any(summary["kv_blocks_used_at_end"].values()), summary["kv_blocks_used_at_end"]
    assert summary["healthy_at_end"] and not summary["server_log_errors"], summary["server_log_errors"]
    for process in ("api", "engine"):
        assert summary["rss_end_mib"][process] < summary["rss_start_mib"][process] + RSS_MARGIN_MIB, summary
    assert proc.returncode == 0, proc.stdout[-2000:]
