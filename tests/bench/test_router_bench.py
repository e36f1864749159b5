"""The router sweep's verdict: the smallest share keeping 97% of `large`'s accuracy per family, their ratio,
and neural against entropy interpolated at each neural point's share."""

from __future__ import annotations

import pytest

from collab_decode.bench.router_bench import interpolate, verdict


def row(policy: str, accuracy: float, share: float) -> dict:
    return {"policy": policy, "accuracy": accuracy, "large_share": share}


def test_interpolation_between_points_and_none_outside():
    fam = [row("entropy:2", 0.5, 0.02), row("entropy:1", 0.9, 0.04)]
    assert interpolate(fam, 0.03) == pytest.approx(0.7)
    assert interpolate(fam, 0.01) is None and interpolate(fam, 0.05) is None


def test_verdict_finds_the_smallest_shares_and_compares_the_families():
    rows = [row("large", 1.0, 1.0), row("entropy:1", 0.99, 0.04), row("entropy:1.5", 0.9, 0.03),
            row("entropy:2", 0.5, 0.02), row("neural:d:0.5", 0.98, 0.029), row("neural:d:0.9", 0.8, 0.021)]
    v = verdict(rows)
    assert v["neural"]["policy"] == "neural:d:0.5" and v["entropy"]["policy"] == "entropy:1"
    assert v["share_ratio"] == pytest.approx(0.029 / 0.04) and v["share_ratio_ok"]
    assert v["beats_entropy_everywhere"]  # 0.98 > 0.89 at 2.9%; 0.8 > 0.54 at 2.1%
    worse = verdict(rows[:-1] + [row("neural:d:0.9", 0.5, 0.021)])
    assert not worse["beats_entropy_everywhere"]
