"""Production behaviour of the two server processes: restarts, cancellation, admission,
bad input, shutdown, auth and TLS, metrics, memory over time."""
from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from qwen2vl_flux.client import Client, ServiceError
from qwen2vl_flux.client.images import image_bytes
from qwen2vl_flux.client.launch import ServerProcess
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc

A = Image.new("RGB", (64, 48), (200, 40, 40))
B = Image.new("RGB", (40, 56), (20, 140, 60))
SMALL = dict(steps=1, width=32, height=32)
# About 0.15 s a step on the tiny preset at 1024x1024 on two CPU cores: long enough to act mid-request.
SLOW = dict(steps=30, aspect_ratio="1:1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(address: str, credentials=None) -> int | None:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
        except grpc.RpcError:
            return None


def slow_request_running(encoder: ServerProcess, generator: ServerProcess, seed: int):
    """A client, its bundle, and a SLOW generation in the background once its first step is done."""
    client = Client(encoder.address, generator.address, timeout=60)
    bundle = client.encode(A)
    started = threading.Event()

    def progress(p):
        if p.step >= 1:
            started.set()

    pool = ThreadPoolExecutor(1)
    running = pool.submit(client.generate, bundle, progress=progress, seed=seed, **SLOW)
    pool.shutdown(wait=False)
    assert started.wait(30)
    return client, bundle, running


@pytest.fixture(scope="module")
def pair(tiny_checkpoints):
    # A long grace: on a loaded CI machine the request SIGTERM interrupts may take a while.
    servers = [ServerProcess(role, tiny_checkpoints, "--grace-seconds", "120").start()
               for role in ("encoder", "generator")]
    for server in servers:
        server.wait_serving()
    yield servers
    for server in servers:
        server.kill()


def test_killed_encoder_fails_fast_and_the_same_client_recovers(pair):
    encoder, generator = pair
    generator_pid = generator.pid
    client, bundle, running = slow_request_running(encoder, generator, seed=1)
    encoder.kill()
    assert len(running.result(timeout=60).images) == 1          # the generation in flight completes

    begin = time.monotonic()
    with pytest.raises(ServiceError) as error:
        client.variation(A, seed=2, **SMALL)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "encoder" in str(error.value)
    assert time.monotonic() - begin < 5                          # not the 60 s deadline

    encoder.start()
    statuses = set()
    while (status := health(encoder.address)) != health_pb2.HealthCheckResponse.SERVING:
        statuses.add(status)
        time.sleep(0.05)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses  # health said so while loading
    assert client.variation(A, seed=2, **SMALL).images            # the encoder retry policy reconnects
    assert generator.pid == generator_pid and generator.process.poll() is None


def test_killed_generator_fails_fast_and_the_same_client_recovers(pair):
    encoder, generator = pair
    encoder_pid = encoder.pid
    client, bundle, running = slow_request_running(encoder, generator, seed=1)
    generator.kill()
    with pytest.raises(ServiceError) as error:
        running.result(timeout=30)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "generator" in str(error.value)

    begin = time.monotonic()
    with pytest.raises(ServiceError) as error:
        client.variation(A, seed=2, **SMALL)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "generator" in str(error.value)
    assert time.monotonic() - begin < 5

    generator.start().wait_serving()
    time.sleep(1.2)   # the channel's reconnect backoff is capped at 1 s; generations are not retried
    assert client.variation(A, seed=2, **SMALL).images
    assert encoder.pid == encoder_pid and encoder.process.poll() is None


def test_sigterm_finishes_the_running_request_refuses_new_ones_and_exits_0(pair):
    encoder, generator = pair
    client, bundle, running = slow_request_running(encoder, generator, seed=3)
    generator.process.terminate()
    time.sleep(0.3)
    with pytest.raises(ServiceError) as error:
        client.generate(bundle, seed=4, **SMALL)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(running.result(timeout=60).images) == 1
    assert generator.process.wait(30) == 0
    generator.start().wait_serving()


def _log_lines(server: ServerProcess, needle: str) -> list[str]:
    return [line for line in server.log_path.read_text(errors="replace").splitlines() if needle in line]


def test_cancel_stops_the_loop_within_a_step_and_frees_the_slot(client, servers, picture=A):
    bundle = client.encode(picture)
    cancel = threading.Event()

    def progress(p):
        if p.step == 2:
            cancel.set()

    with pytest.raises(ServiceError) as error:
        client.generate(bundle, request_id="cancel-me", cancel_event=cancel, progress=progress, seed=1, **SLOW)
    assert error.value.code == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 2            # a step takes ~0.15 s
    while not _log_lines(servers["generator"], '"generation stopped", "request_id": "cancel-me"'):
        assert time.monotonic() < deadline, servers["generator"].log_tail()
        time.sleep(0.05)
    stopped = _log_lines(servers["generator"], '"generation stopped", "request_id": "cancel-me"')[0]
    assert "before step 3 " in stopped or "before step 4 " in stopped
    assert client.generate(bundle, seed=2, **SMALL).images


def test_expired_deadline_stops_the_work(client, servers):
    bundle = client.encode(A)
    with pytest.raises(ServiceError) as error:
        client.generate(bundle, request_id="too-slow", timeout=1.0, seed=1, **SLOW)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 3
    while not _log_lines(servers["generator"], '"generation stopped", "request_id": "too-slow"'):
        assert time.monotonic() < deadline, servers["generator"].log_tail()
        time.sleep(0.05)
    assert client.generate(bundle, seed=2, **SMALL).images


def test_full_queue_is_refused_at_once_and_every_accepted_request_completes(tiny_checkpoints):
    metrics_port = free_port()
    encoder = ServerProcess("encoder", tiny_checkpoints).start()
    generator = ServerProcess("generator", tiny_checkpoints, "--max-queue", "2", "--metrics-port",
                              str(metrics_port), "--max-message-bytes", str(4 * 1024 * 1024)).start()
    try:
        encoder.wait_serving()
        generator.wait_serving()
        client = Client(encoder.address, generator.address, timeout=120)
        bundle = client.encode(A)
        outcomes, lock = [], threading.Lock()

        def one(seed):
            begin = time.monotonic()
            try:
                result = client.generate(bundle, seed=seed, steps=8, aspect_ratio="1:1")
                outcome = ("ok", len(result.images))
            except ServiceError as e:
                outcome = (e.code.name, e.details)
            with lock:
                outcomes.append((outcome, time.monotonic() - begin))

        threads = [threading.Thread(target=one, args=(seed,)) for seed in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        accepted = [o for o in outcomes if o[0][0] == "ok"]
        refused = [o for o in outcomes if o[0][0] == "RESOURCE_EXHAUSTED"]
        assert len(outcomes) == 10 and len(accepted) + len(refused) == 10
        assert len(accepted) == 3 and all(o[0][1] == 1 for o in accepted)   # one running + --max-queue 2
        assert all("--max-queue 2" in o[0][1] for o in refused)
        assert max(seconds for _, seconds in refused) < min(seconds for _, seconds in accepted)

        # Oversize messages are refused by gRPC itself with RESOURCE_EXHAUSTED, naming the sizes.
        big = pb.GenerateRequest(request_id="big", mode=pb.VARIATION, bundle=bundle,
                                 init_image=pb.ImageData(data=bytes(5 * 1024 * 1024)))
        with grpc.insecure_channel(generator.address, [("grpc.max_send_message_length", 64 << 20)]) as channel:
            with pytest.raises(grpc.RpcError) as error:
                list(pb_grpc.GeneratorStub(channel).Generate(big, timeout=30))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in error.value.details()

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        for series in ('qwen2vl_flux_requests_total{role="generator",rpc="Generate",status="OK"} 3.0',
                       'qwen2vl_flux_requests_total{role="generator",rpc="Generate",status="RESOURCE_EXHAUSTED"} 7.0',
                       'qwen2vl_flux_rejected_total{reason="queue_full",role="generator"} 7.0',
                       'qwen2vl_flux_denoise_step_seconds_count{role="generator"} 24.0',
                       'qwen2vl_flux_queue_seconds_count{role="generator",rpc="Generate"} 3.0',
                       'qwen2vl_flux_request_duration_seconds_count{role="generator",rpc="Generate",status="OK"} 3.0',
                       'qwen2vl_flux_in_flight{role="generator"} 0.0', 'qwen2vl_flux_queued{role="generator"} 0.0',
):
            assert series in text, series
    finally:
        encoder.kill()
        generator.kill()


def _bundle_with(client, mutate) -> pb.GenerateRequest:
    bundle = client.encode(A)
    mutate(bundle)
    return pb.GenerateRequest(request_id="bad", mode=pb.VARIATION, bundle=bundle,
                              params=pb.GenerationParams(seed=1, steps=1, width=32, height=32))


def _png(size, mode="RGB") -> bytes:
    return image_bytes(Image.new(mode, size))


@pytest.mark.parametrize("data,message", [
    (b"\x89PNG\r\n\x1a\n not really", "not a readable image"), (b"", "empty"),
    (_png((8000, 8000), "1"), "accepts at most"), (_png((20000, 20000), "1"), "decompression bomb"),
])
def test_bad_images_are_refused_and_the_encoder_keeps_serving(client, servers, data, message):
    request = pb.EncodeRequest(request_id="bad-image", images=[pb.EncoderImage(image=pb.ImageData(data=data))])
    with grpc.insecure_channel(servers["encoder"].address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.EncoderStub(channel).Encode(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    assert health(servers["encoder"].address) == health_pb2.HealthCheckResponse.SERVING
    assert client.encode(A).images


@pytest.mark.parametrize("mutate,message", [
    (lambda b: setattr(b.images[0].tokens.tensor, "data", b.images[0].tokens.tensor.data[:-2]), "needs"),
    (lambda b: setattr(b.pooled, "dtype", 42), "unknown dtype"),
    (lambda b: setattr(b.images[0].tokens, "valid_length", 100000), "valid_length"),
    (lambda b: setattr(b.fingerprint, "checkpoint_id", "another"), "another model"),
])
def test_bad_bundles_are_refused_and_the_generator_keeps_serving(client, servers, mutate, message):
    with grpc.insecure_channel(servers["generator"].address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(pb_grpc.GeneratorStub(channel).Generate(_bundle_with(client, mutate), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    assert health(servers["generator"].address) == health_pb2.HealthCheckResponse.SERVING
    assert client.variation(A, seed=1, **SMALL).images


def test_reflection_lists_the_services(servers):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(servers["generator"].address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"qwen2vl_flux.v1.Generator", "grpc.health.v1.Health"} <= services


def _make_certificates(directory: Path) -> dict[str, Path]:
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_token_tls_and_mutual_tls(tiny_checkpoints, tmp_path):
    certs = _make_certificates(tmp_path)
    (tmp_path / "token").write_text("s3cret\n")
    health_port = free_port()
    tls = ServerProcess("encoder", tiny_checkpoints, "--token-file", str(tmp_path / "token"),
                        "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]))
    mtls = ServerProcess("encoder", tiny_checkpoints, "--tls-cert", str(certs["server.pem"]),
                         "--tls-key", str(certs["server.key"]), "--tls-client-ca", str(certs["ca.pem"]),
                         "--health-port", str(health_port))
    try:
        for server in (tls, mtls):
            server.start()
        _wait_port(tls)
        _wait_port(mtls)
        ca = grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes())
        while health(tls.address, ca) != health_pb2.HealthCheckResponse.SERVING:   # no token needed for health
            time.sleep(0.1)
        with pytest.raises(ServiceError) as error:
            Client(tls.address, tls.address, tls_ca=str(certs["ca.pem"]), timeout=20).encode(A)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ServiceError) as error:
            Client(tls.address, tls.address, tls_ca=str(certs["ca.pem"]), token="wrong", timeout=20).encode(A)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert Client(tls.address, tls.address, tls_ca=str(certs["ca.pem"]), token="s3cret").encode(A).images
        with pytest.raises(ServiceError) as error:                                  # no CA: cannot connect
            Client(tls.address, tls.address, token="s3cret", timeout=5).encode(A)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE

        while health(f"127.0.0.1:{health_port}") != health_pb2.HealthCheckResponse.SERVING:  # plaintext probe port
            time.sleep(0.1)
        with pytest.raises(ServiceError):                                           # mutual TLS: no client cert
            Client(mtls.address, mtls.address, tls_ca=str(certs["ca.pem"]), timeout=5).encode(A)
        with_cert = Client(mtls.address, mtls.address, tls_ca=str(certs["ca.pem"]),
                           tls_cert=str(certs["client.pem"]), tls_key=str(certs["client.key"]))
        assert with_cert.encode(A).images
    finally:
        tls.kill()
        mtls.kill()


def _wait_port(server: ServerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not server.port_file.exists():
        server._check_alive()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.port = int(server.port_file.read_text())


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_soak_resident_memory_stops_growing(client, servers):
    pids = [servers["encoder"].pid, servers["generator"].pid]
    rss = []
    for i in range(200):
        prompt = "" if i % 2 else f"prompt {i % 7}"
        result = client.variation(A, prompt=prompt, seed=i, **SMALL)
        assert len(result.images) == 1
        if i in (49, 199):
            rss.append([_rss_mb(pid) for pid in pids])
    growth = [after - before for before, after in zip(*rss)]
    assert all(g < 40 for g in growth), f"RSS grew by {growth} MB between request 50 and 200"


def test_previews_arrive_on_the_steps_asked(client):
    frames = []
    client.generate(client.encode(A), seed=1, steps=4, width=64, height=64, preview_every=2,
                    progress=lambda p: frames.append((p.step, p.preview.data)))
    assert [(step, bool(data)) for step, data in frames] == [(1, False), (2, True), (3, False), (4, True)]
    with Image.open(io.BytesIO(frames[1][1])) as preview:
        assert preview.format == "JPEG" and preview.size == (16, 16)


def test_encoder_cache_serves_repeats(servers):
    def encode(prompt: str) -> pb.EncodeResponse:
        request = pb.EncodeRequest(request_id="cache", prompt=prompt,
                                   images=[pb.EncoderImage(image=pb.ImageData(data=image_bytes(B)))])
        with grpc.insecure_channel(servers["encoder"].address) as channel:
            return pb_grpc.EncoderStub(channel).Encode(request, timeout=30)

    first, again, other_prompt = encode("cached"), encode("cached"), encode("another prompt")
    assert not first.cache_hit and again.cache_hit and not other_prompt.cache_hit
    assert first.bundle == again.bundle


@pytest.mark.parametrize("output,name", [(pb.OutputOptions(png_compress_level=12), "png_compress_level"),
                                         (pb.OutputOptions(format=pb.JPEG, quality=0), "quality"),
                                         (pb.OutputOptions(format=7), "format")])
def test_bad_output_options_are_refused_before_generating(client, servers, output, name):
    request = pb.GenerateRequest(request_id="bad-output", mode=pb.VARIATION, bundle=client.encode(A), output=output,
                                 params=pb.GenerationParams(seed=1, steps=1, width=32, height=32))
    with grpc.insecure_channel(servers["generator"].address) as channel:
        events = []
        with pytest.raises(grpc.RpcError) as error:
            for event in pb_grpc.GeneratorStub(channel).Generate(request, timeout=30):
                events.append(event)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in error.value.details()
    assert not events                                   # refused before any step ran


def test_output_formats(client):
    bundle = client.encode(A)
    for fmt, mode in (("webp", "RGB"), ("jpeg", "RGB"), ("raw", "RGB")):
        result = client.generate(bundle, seed=1, output_format=fmt, **SMALL)
        assert result.images[0].size == (32, 32) and result.images[0].mode == mode and result.format == fmt
