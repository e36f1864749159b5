"""Mutation check: apply each semantic mutation of the core (tools/mutation/catalog.py) to a copy of the
repository, one at a time, and run the tests meant to catch it. Every mutation must make a test fail.

    .venv/bin/python tools/mutation/run.py            # all of them (~20-30 minutes on 2 cores)
    .venv/bin/python tools/mutation/run.py --only entropy-flipped confidence-flipped
    .venv/bin/python tools/mutation/run.py --list

The working tree is never touched: the copy lives in a temporary directory and is put first on
PYTHONPATH, so the copy's `collab_decode` is the one the tests import (checked before anything runs).
Exit status 0 when every mutation was caught and the unmutated tests pass; a report is written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog import MUTATIONS, Mutation  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (no virtualenv, no caches), and the C modules built in place
    (collab_decode/_hostops.c's: make setup builds them; the copy's tests use them as the checkout's do)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    built = [str(p.relative_to(ROOT)) for p in (ROOT / "collab_decode").glob("*.so")]
    for name in filter(None, listed + built):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n[timed out after {timeout}s]", time.monotonic() - t0


def first_failure(output: str) -> str:
    """The first failed test named in pytest's summary (a failure before an error)."""
    lines = output.splitlines()
    for prefix in ("FAILED ", "ERROR "):
        for line in lines:
            if line.startswith(prefix):
                return line.split(" - ")[0]
    return "(timeout)" if "[timed out" in output else "(no FAILED line)"


def apply(copy: Path, m: Mutation) -> str:
    """Write the mutated file into the copy; returns the original text to restore."""
    path = copy / m.file
    original = path.read_text()
    count = original.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation {m.id}: the text to replace occurs {count} times in {m.file} "
                         "(the catalog is out of date with the source)")
    path.write_text(original.replace(m.old, m.new))
    return original


def check_copy_is_imported(copy: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run([sys.executable, "-c", "import collab_decode; print(collab_decode.__file__)"],
                         cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(copy)):
        raise SystemExit(f"the copy is not what tests import (collab_decode from {out}); aborting")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the unmutated tests first")
    parser.add_argument("--report", default="mutation-report.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.only and len(mutations) != len(set(args.only)):
        raise SystemExit(f"unknown mutation id(s): {sorted(set(args.only) - {m.id for m in MUTATIONS})}")
    if args.list:
        for m in mutations:
            print(f"{m.id:32} {m.area:12} {m.file}\n{'':32} {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="collab-decode-mutation-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        check_copy_is_imported(copy)
        if not args.no_baseline:
            tests = tuple(sorted({t for m in mutations for t in m.tests}))
            print(f"baseline: {len(tests)} test file(s) unmutated ...", flush=True)
            code, out, secs = run_tests(copy, tests, args.timeout * 2)
            if code != 0:
                print(out[-3000:])
                raise SystemExit(f"the unmutated tests fail ({first_failure(out)}): fix them first")
            print(f"baseline passed in {secs:.0f}s", flush=True)
        results = []
        for i, m in enumerate(mutations, 1):
            original = apply(copy, m)
            try:
                code, out, secs = run_tests(copy, m.tests, args.timeout)
            finally:
                (copy / m.file).write_text(original)
            if code in (3, 4, 5):  # internal error, usage error, no tests: the entry is broken, not caught
                raise SystemExit(f"mutation {m.id}: pytest exit {code} running {m.tests}:\n{out[-2000:]}")
            caught = code != 0  # 1: a test failed; 2: collection failed; -1: timed out (e.g. a hang)
            results.append({"id": m.id, "area": m.area, "file": m.file, "why": m.why, "caught": caught,
                            "caught_by": first_failure(out) if caught else None, "seconds": round(secs, 1)})
            verdict = f"caught by {results[-1]['caught_by']}" if caught else "SURVIVED"
            print(f"[{i}/{len(mutations)}] {m.id}: {verdict} ({secs:.0f}s)", flush=True)
    survived = [r["id"] for r in results if not r["caught"]]
    Path(args.report).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{len(results) - len(survived)}/{len(results)} mutations caught; report: {args.report}")
    if survived:
        print("survived: " + ", ".join(survived))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
