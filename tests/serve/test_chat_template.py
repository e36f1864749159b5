"""A chat template that starts with the BOS token, on a tokenizer that also adds BOS to plain text: the
server (REST and gRPC) and `collab-decode generate --chat` tokenize the rendered template without adding
special tokens (vLLM's and Hugging Face's convention), so the prompt holds exactly one BOS."""

from __future__ import annotations

import json
import shutil

import grpc
import openai
import pytest

from collab_decode.cli import main as cli_main
from collab_decode.demo import checkpoint_dir
from collab_decode.engine.config import MIB, EngineConfig
from collab_decode.engine.loading import build_engine, load_tokenizer
from collab_decode.sampling import SamplingParams
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from collab_decode.serve.requests import ServedModel, chat_prompt_ids, text_prompt_ids
from collab_decode.serve.server import ServeConfig
from tests.serve.conftest import PROMPT, reference_run, running_server
from tests.utils import DEMO_TOKENIZER_FILES, demo_tokenizer_dir

BOS = "<|endoftext|>"  # the demo tokenizer's only candidate within the models' vocabulary (BOS == EOS, as in GPT-2)
MAX_TOKENS = 8
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]


def write_bos_tokenizer(path) -> None:
    """The demo tokenizer, changed to add BOS for add_special_tokens=True and to open its chat template with it."""
    src = demo_tokenizer_dir()
    for name in DEMO_TOKENIZER_FILES:
        shutil.copy(src / name, path / name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": BOS}))
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [0], "tokens": [BOS]}}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").write_text("{{ bos_token }}" + template)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo small model with the BOS tokenizer."""
    path = tmp_path_factory.mktemp("bos-model")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(checkpoint_dir("small") / name, path / name)
    write_bos_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def small_engine(model_dir):
    return build_engine(model_dir, config=EngineConfig(small_kv_bytes=8 * MIB, default_policy="small"))


@pytest.fixture(scope="module")
def bos_server(model_dir):
    model = ServedModel(name="bos", small_dir=str(model_dir), large_dir=None)
    config = ServeConfig(port=0, grpc_port=0, log_level="warning")
    with running_server(config, small_engine(model_dir), model) as s:
        yield s


def hf_chat_ids(tokenizer, messages: list[dict] = MESSAGES) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


def test_tokenizer_is_the_case_in_point(tokenizer):
    bos = tokenizer.bos_token_id
    assert text_prompt_ids(tokenizer, "hi")[0] == bos  # plain text gets a BOS
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(BOS)  # and so does the rendered chat template


def test_chat_prompt_ids_hold_one_bos(tokenizer):
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert ids == hf_chat_ids(tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def chat_reply(server, messages: list[dict]):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    return client.chat.completions.create(model="bos", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"return_provenance": True})


def test_server_prompt_holds_one_bos(bos_server, model_dir, tokenizer):
    want_ids = hf_chat_ids(tokenizer)
    want = reference_run(small_engine(model_dir), want_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    got = chat_reply(bos_server, MESSAGES)
    assert got.usage.prompt_tokens == len(want_ids)  # one BOS more would count here
    assert got.choices[0].model_extra["token_ids"] == want.output_ids
    with grpc.insecure_channel(bos_server.grpc_target) as channel:
        chat = pb.Chat(messages=[pb.ChatMessage(**m) for m in MESSAGES])
        reply = pb_grpc.CollabDecodeStub(channel).Generate(pb.GenerateRequest(
            chat=chat, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0)), timeout=60)
    assert reply.usage.prompt_tokens == len(want_ids) and list(reply.token_ids) == want.output_ids


def test_cli_generate_chat_agrees_with_the_server(bos_server, model_dir, tokenizer, capsys):
    user = [{"role": "user", "content": PROMPT}]  # what --chat makes of --prompt
    num_prompt = len(hf_chat_ids(tokenizer, user))
    # no --max-tokens: the CLI generates what the context leaves after its prompt, which shows the prompt's length
    assert cli_main(["generate", "--small", str(model_dir), "--small-kv-mib", "8", "--chat", "--prompt", PROMPT,
                     "--max-model-len", str(num_prompt + MAX_TOKENS), "--json"]) == 0
    by_cli = json.loads(capsys.readouterr().out)
    assert by_cli["finish_reason"] == "length" and len(by_cli["token_ids"]) == MAX_TOKENS
    by_server = chat_reply(bos_server, user)
    assert by_cli["token_ids"] == by_server.choices[0].model_extra["token_ids"]
    assert by_server.usage.prompt_tokens == num_prompt
