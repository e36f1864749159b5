"""Demo-pair tokens/s with the engine flushing denormal floats (as it does every step) and without (the flag
patched out in that process), alternating fresh processes A B A B on one machine; the measurement is
tools/speed_compare.py's (batch 1 and batch 64, greedy, held-out demo problems).

    .venv/bin/python tools/denormal_ab.py [--rounds 3] [--policies large small entropy:0.3 neural:demo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_compare import ROOT, measure  # noqa: E402

NO_FLUSH = "import torch\ntorch.set_flush_denormal = lambda mode: False  # the engine's per-step call: a no-op\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["large", "small", "entropy:0.3", "neural:demo"])
    parser.add_argument("--batch1-problems", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    for r in range(args.rounds):
        for flush in ("off", "on"):
            row = measure(ROOT, args.policies, args.batch1_problems, args.batch, NO_FLUSH if flush == "off" else "")
            for key, value in row.items():
                results[flush].setdefault(key, []).append(value)
            print(f"round {r + 1} flush {flush:3}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()), flush=True)
    print("\nmedian tokens/s (flush on / off):")
    for key in results["off"]:
        off, on = statistics.median(results["off"][key]), statistics.median(results["on"][key])
        print(f"  {key:28} off {off:7.0f}  on {on:7.0f}  ratio {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
