"""The servers under abuse (issue #13): each numbered defect through real server processes,
with the generated stubs, so the client's own checks are bypassed."""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from qwen2vl_flux.client import Client, InvalidArgument, ServiceError
from qwen2vl_flux.client.images import image_bytes
from qwen2vl_flux.client.launch import ServerProcess
from qwen2vl_flux.client.modes import MAX_PROMPT_BYTES, Mode, resolve_parameters
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc
from pictures import picture
from test_production import _log_lines, free_port, health

A = picture(64, 48, seed=1)
SMALL = pb.GenerationParams(seed=1, steps=1, width=32, height=32)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _stubs(address: str):
    channel = grpc.insecure_channel(address, CHANNEL_OPTIONS)
    return channel, pb_grpc.EncoderStub(channel), pb_grpc.GeneratorStub(channel)


def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _encode_request(data: bytes = b"", prompt: str = "", **fields) -> pb.EncodeRequest:
    return pb.EncodeRequest(request_id=fields.pop("request_id", "abuse"), prompt=prompt,
                            images=[pb.EncoderImage(role="a", image=pb.ImageData(data=data or image_bytes(A)))],
                            **fields)


@pytest.fixture(scope="module")
def bundle(client) -> pb.EmbeddingBundle:
    return client.encode(A)


def _generate(bundle, mode=pb.VARIATION, params=SMALL, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=fields.pop("request_id", "abuse"), mode=mode, bundle=bundle,
                              params=params, **fields)


def _still_serving(servers, client, bundle) -> None:
    for role in ("encoder", "generator"):
        assert health(servers[role].address) == health_pb2.HealthCheckResponse.SERVING
    assert client.generate(bundle, seed=3, steps=1, width=32, height=32).images


def _wait_for_log(server: ServerProcess, needle: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while not _log_lines(server, needle):
        assert time.monotonic() < deadline, f"no {needle!r} within {seconds} s:\n{server.log_tail()}"
        time.sleep(0.05)
    return _log_lines(server, needle)[0]


def _solo_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# 1. Cancelled work frees the model ------------------------------------------------------------

def test_cancelled_generations_stop_at_their_next_stage_and_free_the_model(client, servers, bundle):
    """The repro of #13 at CI size: heavy ControlNet requests (1024x1024, two images; about
    10 s each here, most of it VAE encodes before step 1), each cancelled by its deadline
    mid-prepare. Each job stops before its next stage, and a small request then runs at
    once instead of waiting for the abandoned work."""
    big = picture(1024, 1024, seed=2)
    maps = [pb.ControlMap(kind=kind, image=pb.ImageData(data=image_bytes(picture(1024, 1024, seed=s))))
            for kind, s in ((pb.DEPTH, 3), (pb.LINE, 4))]
    small = lambda: client.generate(bundle, seed=1, steps=1, width=32, height=32)  # noqa: E731
    solo = _solo_seconds(small)
    channel, _, generator = _stubs(servers["generator"].address)
    with channel:
        for i in range(3):
            rid = f"heavy-{i}"
            request = _generate(bundle, pb.CONTROLNET, pb.GenerationParams(seed=i, steps=4, image_count=2),
                                init_image=pb.ImageData(data=image_bytes(big)), control_maps=maps, request_id=rid)
            code, _ = _code(lambda: generator.Generate(request, timeout=1.5))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            stopped = json.loads(_wait_for_log(servers["generator"], f'"generation stopped", "request_id": "{rid}"',
                                               15))
            assert stopped["detail"].startswith("stopped before ")
    start = time.perf_counter()
    small()
    after = time.perf_counter() - start
    # One stage of a cancelled job may still be finishing; ~30 s of abandoned work may not.
    assert after < 4 * solo + 5.0, (after, solo)
    log = servers["generator"].log_path.read_text(errors="replace")
    assert '"level": "ERROR"' not in log, "a cancelled call logged an error"


def test_cancelled_encodes_stop_inside_the_forward_pass(servers):
    """Large encodes (4096 tokens, 16384 patches), cancelled by their deadline: each stops at
    the next layer of Qwen2-VL, and a small encode then runs at once. (The largest budget,
    16384 tokens, needs 34 GB for the tiny vision tower's eager attention on the CPU.)"""
    channel, encoder, _ = _stubs(servers["encoder"].address)
    with channel:
        fresh = iter(range(100, 200))
        small = lambda: encoder.Encode(_encode_request(image_bytes(picture(48, 48, seed=next(fresh)))),  # noqa: E731
                                       timeout=60)
        solo = _solo_seconds(small)
        big = image_bytes(picture(1800, 1800, seed=5))
        for i in range(2):
            rid = f"big-encode-{i}"
            request = _encode_request(big, prompt="a prompt", pixel_budget=4096 * 28 * 28, request_id=rid)
            code, _ = _code(lambda: encoder.Encode(request, timeout=0.8))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            stopped = json.loads(_wait_for_log(servers["encoder"], f'"encode stopped", "request_id": "{rid}"', 20))
            assert stopped["detail"].startswith("stopped ")
        start = time.perf_counter()
        small()
        assert time.perf_counter() - start < 4 * solo + 5.0


# 2. Prompt length -----------------------------------------------------------------------------

def test_prompt_over_the_cap_is_refused_before_tokenising(client, servers):
    channel, encoder, _ = _stubs(servers["encoder"].address)
    with channel:
        start = time.perf_counter()
        code, details = _code(lambda: encoder.Encode(_encode_request(prompt="x" * (16 << 20)), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details and str(MAX_PROMPT_BYTES) in details
        assert time.perf_counter() - start < 5   # 16 MB took 52 s of tokenising before
        code, _ = _code(lambda: encoder.Encode(_encode_request(prompt="é" * (MAX_PROMPT_BYTES // 2 + 1)), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT   # UTF-8 bytes, not characters
    with pytest.raises(InvalidArgument, match="prompt"):
        client.encode(A, prompt="x" * (MAX_PROMPT_BYTES + 1))   # mirrored in the client
    assert client.encode(A, prompt="y" * MAX_PROMPT_BYTES).prompt.valid_length == 256


# 3 and 8. Admission before decoding; auth failures (one generator with special flags) ---------

@pytest.fixture(scope="module")
def guarded(tiny_checkpoints, tmp_path_factory, servers):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret-abuse\n")
    metrics_port = free_port()
    generator = ServerProcess("generator", tiny_checkpoints, "--max-queue", "1", "--metrics-port",
                              str(metrics_port), "--token-file", str(token)).start()
    try:
        generator.wait_serving()
        yield generator, metrics_port
    finally:
        generator.kill()


def test_uploads_wait_for_admission_before_decoding(guarded, client, bundle):
    """With --max-queue 1, one running and one queued: img2img requests carrying a 39.7 MP init
    image (a small PNG) are refused at once, not after decoding it."""
    generator, metrics_port = guarded
    auth = (("authorization", "Bearer s3cret-abuse"),)
    huge = image_bytes(Image.new("RGB", (6300, 6300), (90, 120, 30)))
    channel, _, stub = _stubs(generator.address)
    with channel:
        started, outcomes = threading.Event(), []

        def busy(rid, params):
            request = _generate(bundle, params=params, request_id=rid)
            try:
                for event in stub.Generate(request, timeout=120, metadata=auth):
                    if event.HasField("progress"):
                        started.set()
                outcomes.append("ok")
            except grpc.RpcError as e:
                outcomes.append(e.code().name)

        running = pb.GenerationParams(seed=1, steps=12, aspect_ratio="1:1")   # ~2 s here, unloaded
        threads = [threading.Thread(target=busy, args=("busy-running", running))]
        threads[0].start()
        assert started.wait(60)
        threads.append(threading.Thread(target=busy, args=("busy-queued", SMALL)))
        threads[1].start()
        time.sleep(0.5)
        for i in range(5):
            request = _generate(bundle, pb.IMG2IMG, pb.GenerationParams(seed=1, steps=1),
                                init_image=pb.ImageData(data=huge), request_id=f"huge-{i}")
            start = time.perf_counter()
            code, details = _code(lambda: stub.Generate(request, timeout=60, metadata=auth))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue 1" in details
            assert time.perf_counter() - start < 1.5   # decoding it takes seconds
        for t in threads:
            t.join(180)
        assert outcomes == ["ok", "ok"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'qwen2vl_flux_rejected_total{reason="queue_full",role="generator"} 5.0' in text
    assert 'qwen2vl_flux_queued{role="generator"} 0.0' in text
    assert 'qwen2vl_flux_in_flight{role="generator"} 0.0' in text


def test_auth_failures_are_logged_counted_and_one_header_only(guarded):
    generator, metrics_port = guarded
    channel, _, stub = _stubs(generator.address)
    cases = [((), "missing token"), ((("authorization", "Bearer wrong-token-value"),), "wrong token"),
             ((("authorization", "Bearer s3cret-abuse"), ("authorization", "Bearer s3cret-abuse")),
              "several authorization headers")]
    with channel:
        for metadata, reason in cases:
            time.sleep(1.1)   # one log line a second at most
            code, details = _code(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            line = json.loads(_wait_for_log(generator, f'"reason": "{reason}"', 5))
            assert line["rpc"] == "/qwen2vl_flux.v1.Generator/GetInfo" and "127.0.0.1" in line["peer"]
        for _ in range(20):   # a flood: counted, not logged line by line
            _code(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10))
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=(("authorization", "Bearer s3cret-abuse"),))
    log = generator.log_path.read_text(errors="replace")
    assert "s3cret-abuse" not in log and "wrong-token-value" not in log
    assert log.count("unauthenticated call refused") <= 3 + 2
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'qwen2vl_flux_rejected_total{reason="unauthenticated",role="generator"} 23.0' in text


def test_control_maps_are_bounded_before_decoding(servers, bundle):
    many = [pb.ControlMap(kind=pb.DEPTH, image=pb.ImageData(data=image_bytes(A))) for _ in range(20)]
    twice = [pb.ControlMap(kind=pb.LINE, image=pb.ImageData(data=image_bytes(A))) for _ in range(2)]
    channel, _, stub = _stubs(servers["generator"].address)
    with channel:
        for maps, message in ((many, "at most 2"), (twice, "second line map")):
            request = _generate(bundle, pb.CONTROLNET, pb.GenerationParams(seed=1, steps=1),
                                init_image=pb.ImageData(data=image_bytes(A)), control_maps=maps)
            code, details = _code(lambda: stub.Generate(request, timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details and "control_maps" in details


# 4. Output budget per request -----------------------------------------------------------------

@pytest.mark.parametrize("params,name", [
    (dict(width=4096, height=4096, image_count=16, steps=200), "image_count"),
    (dict(width=1024, height=1024, image_count=16, steps=200), "steps"),
    (dict(width=16, height=1048560), "height"),
])
def test_output_budget_is_per_request(servers, bundle, params, name):
    channel, _, stub = _stubs(servers["generator"].address)
    with channel:
        code, details = _code(lambda: stub.Generate(_generate(bundle, params=pb.GenerationParams(seed=1, **params)),
                                                    timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and name in details
    with pytest.raises(InvalidArgument) as error:   # the client's copy of the rule
        resolve_parameters(Mode.VARIATION, dict(seed=1, **params))
    assert error.value.parameter == name


# 5. Previews on every step --------------------------------------------------------------------

def test_a_preview_on_every_step(client, bundle):
    previews = []
    result = client.generate(bundle, seed=1, steps=3, width=32, height=32, preview_every=1,
                             progress=lambda p: previews.append(p.step) if p.preview.data else None)
    assert result.images and previews == [1, 2, 3]


# 6 and 7. Caller mistakes get INVALID_ARGUMENT, not INTERNAL -------------------------------------

def _nan(bundle):
    bundle.pooled.data = b"\x00\x00\xc0\x7f" * (len(bundle.pooled.data) // 4)   # float32 NaN


def _inf(bundle):
    tokens = bundle.images[0].tokens.tensor
    tokens.data = b"\x00\x00\x80\x7f" * (len(tokens.data) // 4)                  # float32 +inf


def _huge_empty(bundle):
    bundle.pooled.shape[:] = [2**62, 2**62, 0]
    bundle.pooled.data = b""


@pytest.mark.parametrize("case,name", [
    ("tiny init image", "init_image"), ("strength leaves no step", "strength"), ("guidance 1e308", "guidance"),
    ("nan pooled", "bundle.pooled"), ("inf tokens", "bundle.images[0]"), ("huge empty pooled", "bundle.pooled"),
])
def test_generator_mistakes_get_invalid_argument(servers, client, bundle, case, name):
    request = {
        "tiny init image": lambda b: _generate(b, pb.IMG2IMG, pb.GenerationParams(seed=1, steps=1),
                                               init_image=pb.ImageData(data=image_bytes(Image.new("RGB", (15, 40))))),
        "strength leaves no step": lambda b: _generate(b, pb.IMG2IMG, pb.GenerationParams(seed=1, strength=1e-20),
                                                       init_image=pb.ImageData(data=image_bytes(A))),
        "guidance 1e308": lambda b: _generate(b, params=pb.GenerationParams(seed=1, steps=1, width=32, height=32,
                                                                            guidance=1e308)),
    }.get(case)
    if request is None:
        broken = pb.EmbeddingBundle()
        broken.CopyFrom(bundle)
        {"nan pooled": _nan, "inf tokens": _inf, "huge empty pooled": _huge_empty}[case](broken)
        request = _generate(broken)
    else:
        request = request(bundle)
    channel, _, stub = _stubs(servers["generator"].address)
    with channel:
        code, details = _code(lambda: stub.Generate(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and name in details, (code, details)
    _still_serving(servers, client, bundle)


def _blank(width: int, height: int) -> pb.ImageData:
    return pb.ImageData(data=image_bytes(Image.new("RGB", (width, height))))


@pytest.mark.parametrize("call,name", [
    (lambda e: e.Encode(_encode_request(_blank(1, 300).data), timeout=30), "images[a]"),
    (lambda e: e.ComputeControlMaps(pb.ControlMapsRequest(image=_blank(1, 1), resize_like_generator=True),
                                    timeout=30), "image"),
    (lambda e: e.ComputeControlMaps(pb.ControlMapsRequest(image=_blank(2, 500)), timeout=30), "aspect ratio"),
])
def test_encoder_mistakes_get_invalid_argument(servers, client, bundle, call, name):
    channel, encoder, _ = _stubs(servers["encoder"].address)
    with channel:
        code, details = _code(lambda: call(encoder))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and name in details, (code, details)
    _still_serving(servers, client, bundle)


# 9. request_id --------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", ["x" * (1 << 20), "has space", "new\nline", "ünïcode"],
                         ids=["1MB", "space", "newline", "unicode"])
def test_request_id_is_bounded(servers, client, bundle, rid):
    channel, encoder, stub = _stubs(servers["generator"].address)
    with channel:
        code, details = _code(lambda: stub.Generate(_generate(bundle, request_id=rid), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in details and len(details) < 400
        code, _ = _code(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=30, metadata=(("x-request-id", "a b"),)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert max(len(line) for line in servers["generator"].log_path.read_text(errors="replace").splitlines()) < 10_000
    with pytest.raises(InvalidArgument, match="request_id"):
        client.generate(bundle, request_id=rid, seed=1, steps=1, width=32, height=32)
    assert client.generate(bundle, request_id="fine-id_1.2:3", seed=1, steps=1, width=32, height=32).images


# 10. Hardening --------------------------------------------------------------------------------

def _saved(fmt: str, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_only_allow_listed_formats_are_opened(servers, client, bundle):
    channel, encoder, _ = _stubs(servers["encoder"].address)
    with channel:
        for fmt in ("EPS", "ICO", "PPM"):
            code, details = _code(lambda: encoder.Encode(_encode_request(_saved(fmt)), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and f"is {fmt}" in details and "PNG" in details
        for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
            code, details = _code(lambda: encoder.Encode(_encode_request(_saved(fmt), request_id=fmt), timeout=60))
            assert code == grpc.StatusCode.OK, (fmt, details)


def test_garbage_request_bytes_are_invalid_argument_and_logged(servers):
    for role, method in (("encoder", "/qwen2vl_flux.v1.Encoder/Encode"),
                         ("generator", "/qwen2vl_flux.v1.Generator/Generate")):
        with grpc.insecure_channel(servers[role].address) as channel:
            if role == "encoder":
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                code, details = _code(lambda: call(b"\xff\xff\xff\xff garbage", timeout=10))
            else:
                call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
                code, details = _code(lambda: call(b"\xff\xff\xff\xff garbage", timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details
        line = json.loads(_wait_for_log(servers[role], "undecodable request refused", 5))
        assert line["rpc"] == method
        assert health(servers[role].address) == health_pb2.HealthCheckResponse.SERVING


def test_get_info_reports_the_limits(client):
    info = client.info()
    encoder, generator = info["encoder"].limits, info["generator"].limits
    assert encoder.max_prompt_bytes == MAX_PROMPT_BYTES and encoder.max_request_id_length == 128
    assert generator.max_output_pixels == 16 * 1024 * 1024 and generator.max_pixel_steps > generator.max_output_pixels
    assert generator.max_control_maps == 2 and generator.max_guidance == 100 and generator.min_image_side == 16
    assert {"PNG", "JPEG", "MPO", "WEBP"} <= set(encoder.image_formats) and "EPS" not in encoder.image_formats
