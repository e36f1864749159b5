"""deploy/ checked as far as this machine allows (no Docker, no cluster): the YAML parses; every collab-decode
command the Dockerfiles, compose and Kubernetes run parses with our own CLI (after Kubernetes' $(VAR)
expansion from the ConfigMap); ports, paths, probe targets, Service ports, Secret keys, ConfigMap keys and
the large model's URL and name agree across files; the README covers every file. The vLLM flags they use
are checked against vLLM itself by tests/backends/test_remote_vllm.py (vllm_flags_in_deploy)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from collab_decode.backends.remote import API_KEY_ENV as LARGE_API_KEY_ENV
from collab_decode.cli import build_parser
from collab_decode.serve.cli import API_KEY_ENV

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COLLAB_DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")


def parse_cli(argv: list[str]):
    """Our CLI's namespace for argv; fails the test where it does not parse or abbreviates a flag (argparse
    would accept `--large-model` for `--large-model-name`)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"collab-decode does not accept: {' '.join(argv)}")
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    known = subcommands[argv[0]]._option_string_actions
    unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"collab-decode {argv[0]} has no flag {unknown} (only an abbreviation of one)"
    return args


def dockerfile_instruction(path: Path, name: str) -> list[str]:
    """The exec-form (JSON) argument of a Dockerfile instruction (its last occurrence)."""
    text = path.read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, flags=re.M)
    assert found, f"{path.name} has no exec-form {name}"
    return json.loads(found[-1])


def k8s(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]


def k8s_object(kind: str, name: str) -> dict:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in k8s(path.name):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    pytest.fail(f"no {kind} {name!r} in deploy/k8s")


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args; every variable must be defined."""
    def one(match):
        assert match.group(1) in env, f"$({match.group(1)}) is not in the container's environment"
        return env[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg) for arg in args]


def app_paths() -> set[str]:
    from collab_decode.serve.openai_api import create_app

    return {route.path for route in create_app(None, None, None).routes}


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def vllm_flags_in_deploy() -> set[str]:
    """Every flag deploy/ gives vLLM's server (compose and Kubernetes)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    argv = compose["services"]["vllm"]["command"] + container(k8s_object("Deployment", "vllm"))["args"]
    return {a for a in argv if a.startswith("--")}


# ---- Dockerfiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COLLAB_DOCKERFILES)
def test_dockerfile_runs_a_command_our_cli_accepts_on_the_ports_it_exposes(name):
    path = DEPLOY / name
    assert dockerfile_instruction(path, "ENTRYPOINT") == ["collab-decode"]
    argv = dockerfile_instruction(path, "CMD")
    args = parse_cli(argv)
    assert args.command == "serve" and args.host == "0.0.0.0"
    exposed = set(re.search(r"^EXPOSE\s+(.+)$", path.read_text(), flags=re.M).group(1).split())
    assert {str(args.port), str(args.grpc_port)} == exposed
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", path.read_text())
    assert health and int(health.group(1)) == args.port and health.group(2) in app_paths()


@pytest.mark.parametrize("name", COLLAB_DOCKERFILES + ("Dockerfile.vllm-cpu",))
def test_dockerfile_copies_files_that_exist(name):
    for line in re.findall(r"^COPY\s+(.+)$", (DEPLOY / name).read_text(), flags=re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source} (build context: the repository root)"


# ---- compose ------------------------------------------------------------------------------------
def test_compose_wires_collab_decode_to_vllm_and_prometheus_to_both():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"collab-decode", "vllm", "prometheus"}
    for service in ("collab-decode", "vllm"):
        build = services[service]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    args = parse_cli(services["collab-decode"]["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    published = {int(p.split(":")[1]) for p in services["collab-decode"]["ports"]}
    assert published == {args.port, args.grpc_port}
    vllm = services["vllm"]["command"]
    url = urlparse(args.large_url)
    assert (url.hostname, url.port, url.path) == ("vllm", int(flag_value(vllm, "--port")), "/v1")
    assert args.large_model_name == flag_value(vllm, "--served-model-name")
    assert {"--enable-prefix-caching", "--max-logprobs"} <= set(vllm)
    assert int(flag_value(vllm, "--max-logprobs")) >= args.large_logprobs
    for service in services.values():
        for volume in service.get("volumes", []):
            assert (DEPLOY / volume.split(":")[0]).exists(), f"compose mounts {volume}: no such path"
    assert services["collab-decode"]["environment"].keys() == {API_KEY_ENV}


def test_prometheus_scrapes_the_metrics_paths_and_ports_compose_serves():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    ports = {"collab-decode": parse_cli(compose["services"]["collab-decode"]["command"]).port,
             "vllm": int(flag_value(compose["services"]["vllm"]["command"], "--port"))}
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {job["job_name"]: (job["metrics_path"], job["static_configs"][0]["targets"])
               for job in config["scrape_configs"]}
    assert targets == {name: ("/metrics", [f"{name}:{port}"]) for name, port in ports.items()}
    assert "/metrics" in app_paths()


# ---- Kubernetes ---------------------------------------------------------------------------------
def collab_decode_argv() -> tuple[list[str], dict]:
    deployment = k8s_object("Deployment", "collab-decode")
    c = container(deployment)
    settings = {}
    for source in c["envFrom"]:
        settings.update(k8s_object("ConfigMap", source["configMapRef"]["name"])["data"])
    return expand(c["args"], settings), settings


def test_k8s_manifests_parse_and_name_known_kinds():
    kinds = [doc["kind"] for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in k8s(path.name)]
    assert sorted(kinds) == sorted(["ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service",
                                    "Deployment", "Service"])


def test_k8s_collab_decode_args_parse_after_configmap_expansion():
    argv, settings = collab_decode_argv()
    args = parse_cli(argv)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.device == "cuda"
    assert args.large_url == settings["LARGE_URL"] and args.small == settings["SMALL_MODEL_DIR"]
    assert args.small_kv_mib == int(settings["SMALL_KV_MIB"])


def test_k8s_collab_decode_ports_probes_and_service_agree():
    args = parse_cli(collab_decode_argv()[0])
    c = container(k8s_object("Deployment", "collab-decode"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port}
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] in app_paths() and c[probe]["httpGet"]["port"] == "http"
    assert c["livenessProbe"]["grpc"]["port"] == args.grpc_port  # grpc.health.v1, served beside the API
    service = k8s_object("Service", "collab-decode")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"].items() <= c_labels("collab-decode").items()


def c_labels(name: str) -> dict:
    return k8s_object("Deployment", name)["spec"]["template"]["metadata"]["labels"]


def test_k8s_secrets_and_volumes_exist_where_they_are_referenced():
    secret = k8s_object("Secret", "collab-decode-keys")
    env = {e["name"]: e for name in ("collab-decode", "vllm") for e in container(k8s_object("Deployment", name))["env"]}
    assert {API_KEY_ENV, LARGE_API_KEY_ENV} <= env.keys()
    for e in env.values():
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # the key collab-decode sends vLLM is the one vLLM checks
    assert env[LARGE_API_KEY_ENV]["valueFrom"] == env["VLLM_API_KEY"]["valueFrom"]
    pvc = k8s_object("PersistentVolumeClaim", "models")["metadata"]["name"]
    for name in ("collab-decode", "vllm"):
        volumes = k8s_object("Deployment", name)["spec"]["template"]["spec"]["volumes"]
        assert pvc in {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    mount = container(k8s_object("Deployment", "collab-decode"))["volumeMounts"][0]["mountPath"]
    assert parse_cli(collab_decode_argv()[0]).small.startswith(mount + "/")


def test_k8s_replicas_share_one_vllm_pool_behind_its_service():
    args = parse_cli(collab_decode_argv()[0])
    assert k8s_object("Deployment", "collab-decode")["spec"]["replicas"] > 1
    vllm = container(k8s_object("Deployment", "vllm"))
    service = k8s_object("Service", "vllm")
    url = urlparse(args.large_url)
    assert url.hostname == service["metadata"]["name"] and url.path == "/v1"
    assert url.port == service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in vllm["ports"]}
    assert int(flag_value(vllm["args"], "--port")) == vllm["ports"][0]["containerPort"]
    assert args.large_model_name == flag_value(vllm["args"], "--served-model-name")
    assert {"--enable-prefix-caching", "--max-logprobs", "--tensor-parallel-size"} <= set(vllm["args"])
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # a replica's sequences find their prefixes cached


def test_readme_has_a_section_for_every_file():
    readme = (DEPLOY / "README.md").read_text()
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [f for f in files if f not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"
    commands = re.findall(r"^\s*(?:\S*/)?collab-decode (serve [^\n]+)$", readme.replace("\\\n", " "), flags=re.M)
    assert commands
    for command in commands:
        parse_cli(command.split())
