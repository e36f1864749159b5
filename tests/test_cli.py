"""The CLI as a user runs it: a subprocess, real model directories, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.utils import make_pair, save_tiny_lm


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "collab_decode.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def test_generate_single_model_json(pair):
    from collab_decode.engine.loading import build_engine
    from collab_decode.sampling import SamplingParams

    out = run_cli("generate", "--model", str(pair[0]), "--prompt", "Ann has 3", "--max-tokens", "12",
                  "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    engine = build_engine(pair[0])
    expected = engine.generate(["Ann has 3"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert "Ann has 3" not in result["text"] or expected.text.startswith("Ann has 3")


def test_generate_pair_json_has_provenance_and_large_share(pair):
    out = run_cli("generate", "--small", str(pair[0]), "--large", str(pair[1]), "--policy", "large",
                  "--prompt", "Hi", "--max-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["provenance"] == ["large"] * len(result["token_ids"])
    assert result["stats"]["large_share"] == 1.0


def test_generate_highlights_large_tokens_in_the_terminal(pair):
    out = run_cli("generate", "--small", str(pair[0]), "--large", str(pair[1]), "--policy", "random:0.5",
                  "--prompt", "Hi", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "\x1b[1;30;43m" in out.stdout and "large share" in out.stdout


def test_bad_input_gives_a_clear_error(pair, tmp_path):
    out = run_cli("generate", "--model", str(pair[0]), "--prompt", "x", "--policy", "entropy:oops")
    assert out.returncode == 2 and "bad argument 'oops'" in out.stderr
    out = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_pair_with_different_tokenizers_is_refused_before_loading(pair, tmp_path):
    other = save_tiny_lm(tmp_path / "other", seed=3)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same strings, different ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    (other / "model.safetensors").write_bytes(b"not loaded")  # would fail loudly if weights were read first
    out = run_cli("generate", "--small", str(pair[0]), "--large", str(other), "--policy", "large", "--prompt", "x")
    assert out.returncode == 2 and "do not share a tokenizer" in out.stderr
