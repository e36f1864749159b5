"""Virtual environments of their own for tools whose pins clash with ours (vLLM, lm-evaluation-harness),
built once and cached between runs; a test that needs one is skipped, with pip's words, only where the
package cannot be installed."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

INSTALL_TIMEOUT_S = 1800


def ensure_venv(venv: Path, packages: tuple[str, ...], check_import: str, uninstall: tuple[str, ...] = ()) -> Path:
    """The python of the cached environment at `venv` with `packages` installed (then `uninstall` removed),
    built on first use; `check_import` (module names, comma separated) must import there. Skips the test where
    pip cannot install the packages; other failures fail it."""
    python, ready = venv / "bin" / "python", venv / ".collab-decode-ready"
    if ready.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (parallel sessions share the cache)
        if ready.exists():
            return python
        if not python.exists():
            run_or_raise([sys.executable, "-m", "venv", str(venv)], f"create the virtual environment {venv}")
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True,
                                 text=True, timeout=INSTALL_TIMEOUT_S)
        if install.returncode != 0:
            tail = "\n".join((install.stderr or install.stdout).strip().splitlines()[-5:])
            pytest.skip(f"{packages[0]} cannot be installed here, so the test cannot run against it: {tail}")
        if uninstall:
            run_or_raise([str(python), "-m", "pip", "uninstall", "-y", "-q", *uninstall],
                         "remove " + "/".join(uninstall))
        run_or_raise([str(python), "-c", f"import {check_import}"], f"import {check_import}")
        ready.touch()
    return python


def run_or_raise(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"cannot {what}: {' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-2000:]}")
