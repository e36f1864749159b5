"""The benchmark's files: report.json, and the human-readable ones (the Markdown tables, the Pareto plot,
the coloured answers)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path

from collab_decode.bench.report import ACCURACY_FLOOR, Run, checks


def _f(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value) -> str:
    return _f(None if value is None else 100 * value, "{:.1f}%")


def _cpu(r: Run) -> str:
    """Cores busy during a server run: the load generator / the server's API process / its engine process."""
    if r.client_cpu_share is None:
        return "-"
    server = r.server_cpu_share or {}
    return " / ".join(_f(x, "{:.2f}") for x in (r.client_cpu_share, server.get("api"), server.get("engine")))


def _bound_sign(check: dict) -> str:
    return "<=" if check.get("at_most") else ">="


def _pairs(check: dict) -> str:
    """How a ratio of rows was taken: its side-by-side repeats (pass by pass), and from the rows' medians."""
    if "of_medians" not in check:
        return ""
    pairs = f"the median of the side-by-side repeats {', '.join(map(str, check['pairs']))}; " if check["pairs"] else ""
    return f" ({pairs}from the rows' medians {check['of_medians']})"


def _speed_rows(runs: list[Run]) -> list[str]:
    lines = ["| mode | batch / conc. | policy | accuracy | large share | tok/s | speedup | bound | of bound "
             "| TTFT p50 ms | TPOT p50 ms | TPOT p95 ms | cores: client / api / engine |", "|---" * 13 + "|"]
    for r in runs:
        lines.append(f"| {r.mode} | {r.level} | {r.policy} | {_pct(r.accuracy)} ({r.accuracy_requests}) "
                     f"| {_pct(r.large_share)} | {r.tokens_per_s:.0f} | {_f(r.speedup, '{:.2f}x')} "
                     f"| {_f(r.bound, '{:.2f}x')} | {_pct(r.of_bound)} | {_f(r.ttft_ms_p50)} "
                     f"| {_f(r.tpot_ms_p50, '{:.2f}')} | {_f(r.tpot_ms_p95, '{:.2f}')} | {_cpu(r)} |")
    return lines


def _breakdown_rows(runs: list[Run]) -> list[str]:
    lines = ["| policy | ms/token | small fwd | large fwd | engine | outside steps | large calls/token "
             "| large ms/call | catch-up tokens/call | engine / small step | of it routing |", "|---" * 11 + "|"]
    for r in runs:
        b = r.breakdown
        lines.append(f"| {r.policy} | {b['ms_per_token']:.3f} | {b['small_forward']:.3f} | {b['large_forward']:.3f} "
                     f"| {b['engine']:.3f} | {b['outside_steps']:.3f} | {b['large_calls_per_token']:.3f} "
                     f"| {_f(b['large_ms_per_call'], '{:.2f}')} | {_f(b['catchup_tokens_per_call'])} "
                     f"| {_pct(b.get('engine_of_small_step'))} | {_pct(b.get('route_of_small_step'))} |")
    return lines


def markdown(runs: list[Run], checks: list[dict], meta: dict) -> str:
    threads = (f" Engine threads: {meta['threads']}, {meta['chunk_threads']} for a long chunk at low load."
               if "chunk_threads" in meta else "")
    if meta.get("large_wait_steps"):
        threads += f" A routed token waits up to {meta['large_wait_steps']} steps to share a large-model call."
    lines = ["# collab-decode benchmark", "", f"Machine: {meta.get('machine', '?')}.{threads}", "",
             f"Command: `{meta.get('command', '?')}`", "",
             f"Took {meta.get('minutes', '?')} minutes. Load average before / after: {meta.get('load_before', '?')} "
             f"/ {meta.get('load_after', '?')}.", "",
             "Accuracy: greedy answers right, over the number of problems in brackets. Speedup: tokens/s over "
             "`large` alone at the same batch size (engine) or concurrency (server), same run. Bound: "
             "1 / (c_small/c_large + large share), from `small` and `large` alone at that batch. tok/s: the median "
             "of the repeats; latency percentiles over every request of every repeat.", ""]
    if checks:
        lines += ["## Must show", ""] + [f"- {'ok' if c['ok'] else 'SHORT'}: {c['what']} = {c['value']} "
                                         f"(target {_bound_sign(c)} {c['target']}){_pairs(c)}" for c in checks] + [""]
    batch1 = [r for r in runs if r.mode == "engine" and r.level == 1]
    if batch1:
        lines += ["## Engine, batch 1, every policy", ""] + _speed_rows(batch1) + [""]
    rest = [r for r in runs if not (r.mode == "engine" and r.level == 1)]
    if rest:
        lines += ["## Engine and server at batch size = concurrency", ""]
        lines += _speed_rows(sorted(rest, key=lambda r: (r.level, r.policy, r.mode))) + [""]
    broken = [r for r in batch1 if r.breakdown]
    if broken:
        lines += ["## Where batch-1 time goes (ms per output token)", "",
                  "small fwd / large fwd: inside the models' forwards (input preparation included); engine: the "
                  "rest of each step (scheduling, sampling, routing, commit, detokenizing); outside steps: the "
                  "benchmark's own loop. engine / small step: the engine's own time per step over the small "
                  "model's forward per step (target < 10%); of it routing: the routers' decisions within it.", ""]
        lines += _breakdown_rows(broken) + [""]
    return "\n".join(lines)


def pareto_plot(runs: list[Run], path: Path) -> None:
    """Accuracy against batch-1 speedup and against large share, one curve per policy family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r.mode == "engine" and r.level == 1 and r.speedup is not None]
    families: dict[str, list[Run]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x, label in ((axes[0], "speedup", "speedup over large alone (batch 1, same run)"),
                         (axes[1], "large_share", "large share (output tokens from the large model)")):
        for family, members in sorted(families.items()):
            members = sorted(members, key=lambda r: getattr(r, x))
            ax.plot([getattr(r, x) for r in members], [r.accuracy for r in members],
                    "o-" if len(members) > 1 else "s", label=family, markersize=5)
        large = next((r for r in rows if r.policy == "large"), None)
        if large is not None:
            ax.axhline(ACCURACY_FLOOR * large.accuracy, color="grey", ls=":", lw=1,
                       label=f"{ACCURACY_FLOOR:.0%} of large's accuracy")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (greedy, held-out problems)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("symlog", linthresh=0.01)  # the routed policies sit between 1% and 10%
    axes[1].set_xlim(left=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("speed against accuracy, per routing policy family")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def answers_html(tokenizer, answers: list[dict]) -> str:
    """A page of answers, each token coloured by the model that wrote it. `answers`: dicts with policy,
    question, token_ids, provenance, correct."""
    parts = ["<!doctype html><meta charset='utf-8'><title>collab-decode answers</title>",
             "<style>body{font:14px sans-serif;max-width:60em;margin:2em auto} pre{white-space:pre-wrap;"
             "font:13px monospace;background:#fafafa;padding:.6em;border:1px solid #ddd}"
             " .large{background:#ffd54f} .small{color:#333}</style>",
             "<h1>Answers, coloured by the model that wrote each token</h1>",
             "<p><span class='large'>highlighted</span>: the large model; plain: the small model.</p>"]
    for a in answers:
        num_large = sum(p == "large" for p in a["provenance"])
        parts.append(f"<h3>{html.escape(a['policy'])}: {'right' if a['correct'] else 'wrong'}, {num_large} of "
                     f"{len(a['token_ids'])} tokens from the large model</h3>")
        parts.append(f"<p>{html.escape(a['question'])}</p><pre>")
        for token, source in zip(a["token_ids"], a["provenance"]):
            piece = html.escape(tokenizer.decode([token], skip_special_tokens=True))
            parts.append(f"<span class='{source}'>{piece}</span>")
        parts.append("</pre>")
    return "".join(parts)


def write_report(out: Path, runs: list[Run], meta: dict, answers_page: str | None = None) -> None:
    """report.json (meta, runs, checks), report.md, pareto.png and, if given, answers.html, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    found = checks(runs, routed=meta.get("best_routed_batch1"))
    doc = {"meta": meta, "runs": [asdict(r) for r in runs], "checks": found}
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    (out / "report.md").write_text(markdown(runs, found, meta))
    if any(r.mode == "engine" and r.level == 1 for r in runs):
        pareto_plot(runs, out / "pareto.png")
    if answers_page is not None:
        (out / "answers.html").write_text(answers_page)
