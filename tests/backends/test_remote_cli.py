"""The --large-* flags (one per RemoteConfig field) on `generate` and `serve`: each lands where it should, and
`generate --large-url` writes what the local large model writes. tests/test_cli.py and tests/serve/test_cli.py
count these flags as checked through REMOTE_FLAGS_CHECKED."""

from __future__ import annotations

import json

import pytest

from collab_decode.backends.remote import API_KEY_ENV, RemoteConfig, remote_fields
from collab_decode.cli import build_parser, main
from collab_decode.demo import checkpoint_dir
from collab_decode.engine.args import engine_from_args, remote_from_args
from collab_decode.serve.cli import engine_dirs, resolve_defaults
from tests.backends.conftest import ENDPOINT_MODEL, large_endpoint

REMOTE_FLAGS_CHECKED = {"--large-" + f.name.replace("_", "-") for f in remote_fields()}
PROMPT = "Ann has 352 marbles. (a) She finds 179 more. How many marbles does Ann have now?"
SETTINGS = ["--large-logprobs", "7", "--large-timeout-s", "12.5", "--large-max-retries", "4",
            "--large-max-concurrency", "3", "--large-failure-threshold", "5", "--large-probe-interval-s", "0.25",
            "--large-connect-timeout-s", "9"]


@pytest.fixture(scope="module")
def endpoint():
    with large_endpoint() as server:
        yield server


def test_the_checked_flags_are_the_remote_config_fields():
    assert REMOTE_FLAGS_CHECKED == {"--large-url", "--large-model-name", "--large-logprobs", "--large-timeout-s",
                                    "--large-max-retries", "--large-max-concurrency", "--large-failure-threshold",
                                    "--large-probe-interval-s", "--large-connect-timeout-s"}


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_each_flag_lands_in_the_remote_backend(endpoint, command, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    extra = ["--prompt", "x"] if command == "generate" else []
    args = build_parser().parse_args([command, "--pair", "demo", "--large-url", endpoint.url + "/v1",
                                      "--large-model-name", ENDPOINT_MODEL, *SETTINGS, *extra])
    assert remote_from_args(args) == RemoteConfig(url=endpoint.url + "/v1", model_name=ENDPOINT_MODEL, logprobs=7,
                                                  timeout_s=12.5, max_retries=4, max_concurrency=3,
                                                  failure_threshold=5, probe_interval_s=0.25, connect_timeout_s=9)
    engine = engine_from_args(resolve_defaults(args) if command == "serve" else args)
    large = engine.backends["large"]
    client = large.client
    assert (large.model_name, large.logprobs, large.max_model_len) == (ENDPOINT_MODEL, 7, engine.max_model_len)
    assert (client.base_url, client.timeout_s, client.max_retries) == (endpoint.url, 12.5, 4)
    assert (client.circuit.failure_threshold, client.probe_interval_s, client.max_concurrency) == (5, 0.25, 3)
    if command == "serve":
        assert engine_dirs(args) == (str(checkpoint_dir("small")), endpoint.url + "/v1")  # /v1/models shows it
    engine.close()


def test_generate_through_the_endpoint_writes_what_the_local_large_model_writes(endpoint, capsys):
    flags = ["--pair", "demo", "--policy", "large", "--prompt", PROMPT, "--max-tokens", "24", "--json"]
    assert main(["generate", *flags, "--large-url", endpoint.url]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["generate", *flags]) == 0  # both models local
    assert remote["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
    assert len(remote["token_ids"]) == 24 and remote["stats"]["large_share"] == 1.0


def test_wrong_model_name_and_unreachable_endpoint_are_clear_errors(endpoint, capsys):
    flags = ["generate", "--pair", "demo", "--prompt", "x", "--policy", "large"]
    assert main([*flags, "--large-url", endpoint.url, "--large-model-name", "nope"]) == 2
    assert f"serves ['{ENDPOINT_MODEL}'], not 'nope'" in capsys.readouterr().err
    assert main([*flags, "--large-url", "http://127.0.0.1:9", "--large-connect-timeout-s", "0.5"]) == 2
    assert "cannot reach the large model's endpoint http://127.0.0.1:9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", "m", "--prompt", "x", "--large-url", endpoint.url])


def test_the_endpoint_key_comes_from_the_environment(monkeypatch, capsys):
    with large_endpoint(api_key="secret") as guarded:
        flags = ["generate", "--pair", "demo", "--prompt", PROMPT, "--policy", "large", "--max-tokens", "4",
                 "--large-url", guarded.url]
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        assert main(flags) == 2 and "API key" in capsys.readouterr().err
        monkeypatch.setenv(API_KEY_ENV, "secret")
        assert main(flags) == 0
