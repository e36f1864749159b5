"""No pickle anywhere: unpickling runs whatever code the bytes name, so a checkpoint, router or dataset read
with it is code execution for whoever wrote the file. Weights are safetensors, configs JSON (DESIGN.md).

Scanned (the syntax tree, so comments and strings don't count): the package, tools/ and tests/ (but this
file). Refused: importing pickle, cPickle, _pickle, cloudpickle, dill, joblib or shelve, or calling their
load/loads/Unpickler; `torch.load(...)` without `weights_only=True`; `np.load(..., allow_pickle=True)`;
`pandas.read_pickle`. Each finding is named by file:line.

One exception, allowed below by exact text: serve/engine_core.py talks to its own engine process over a
multiprocessing pipe, which pickles the messages between two processes of the same server (the spawn start
method pickles the engine builder too). Nothing read from a file or a client goes through it: requests are
parsed by the REST/gRPC layers into dataclasses first. `_picklable` checks that an exception raised in the
engine process survives that pipe (else it sends a RuntimeError naming it). Replacing the pipe's format would
mean a schema for EngineInfo (which carries the tokenizer object), SamplingParams, routing specs and
exceptions: not worth it for a channel between our own two processes.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("collab_decode", "tools", "tests")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve"}
ALLOWED = {  # (file, the line's text, stripped): why
    ("collab_decode/serve/engine_core.py", "import pickle"): "the engine process's own pipe (module docstring)",
    ("collab_decode/serve/engine_core.py", "pickle.loads(pickle.dumps(e))"):
        "checks an exception survives the engine pipe",
}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    """`torch.load` -> "torch.load"; anything else that is not a plain dotted name -> ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def findings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every use of pickle in a module's syntax tree."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, f"imports {a.name}") for a in node.names
                    if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            out.append((node.lineno, f"imports from {node.module}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load"):
                if not _is_true(_keyword(node, "weights_only")):
                    out.append((node.lineno, "torch.load without weights_only=True"))
            elif name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
                out.append((node.lineno, f"{name} with allow_pickle=True"))
            elif name.endswith("read_pickle"):
                out.append((node.lineno, name))
            elif name.split(".")[0] in PICKLING_MODULES and name.rsplit(".", 1)[-1] in ("load", "loads", "Unpickler"):
                out.append((node.lineno, name))
    return out


def scan() -> tuple[list[str], set]:
    """Findings not allowed ("file:line: what"), and the allowed entries that were seen."""
    bad, seen = [], set()
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():
                continue
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            for line, what in findings(ast.parse(text, filename=rel)):
                key = (rel, lines[line - 1].strip())
                if key in ALLOWED:
                    seen.add(key)
                else:
                    bad.append(f"{rel}:{line}: {what}")
    return bad, seen


def test_no_pickle_anywhere():
    bad, seen = scan()
    assert not bad, "pickle (or a loader that unpickles) in the source:\n" + "\n".join(bad)
    assert seen == set(ALLOWED), f"allowed uses no longer in the source (drop them here): {set(ALLOWED) - seen}"


def test_the_scanner_finds_each_kind():
    source = """
import pickle
import cloudpickle as cp
from joblib import load
x = torch.load(path)
y = torch.load(path, weights_only=False)
z = torch.load(path, weights_only=True)
a = np.load(path, allow_pickle=True)
b = np.load(path)
c = pd.read_pickle(path)
d = pickle.loads(data)
# import pickle  (a comment is not code)
s = "torch.load(path)"
"""
    lines = [line for line, _ in findings(ast.parse(source))]
    assert sorted(lines) == [2, 3, 4, 5, 6, 8, 10, 11]
