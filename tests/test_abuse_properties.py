"""Property-based abuse of the real tiny servers through the raw stubs: random and boundary
requests of every RPC never get INTERNAL or UNKNOWN, both servers stay SERVING, and a good
request succeeds afterwards. Each example is cheap by construction (images of at most 64 px,
sizes of at most 32 px, 2 steps, 2 images) and has a short deadline; the example count keeps
the whole test near 1.5 minutes on the CI machine (QWEN2VL_FLUX_ABUSE_EXAMPLES changes it)."""
from __future__ import annotations

import io
import math
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen2vl_flux.client.images import image_bytes
from qwen2vl_flux.client.modes import MAX_PROMPT_BYTES
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc
from pictures import picture
from test_production import health

EXAMPLES = int(os.environ.get("QWEN2VL_FLUX_ABUSE_EXAMPLES", "100"))
DEADLINE = 20.0
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _saved(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


_RGBA = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
IMAGES = [
    b"", b"garbage bytes", image_bytes(picture(64, 48, seed=1))[:60], image_bytes(picture(64, 48, seed=1)),
    image_bytes(picture(32, 32, seed=2)), image_bytes(Image.new("RGB", (1, 1))), image_bytes(Image.new("RGB", (15, 15))),
    image_bytes(Image.new("RGB", (16, 16))), image_bytes(Image.new("RGB", (1, 300))), image_bytes(Image.new("RGB", (40, 3))),
    image_bytes(Image.new("1", (8000, 8000))), image_bytes(_RGBA), _saved(picture(40, 24, seed=3), "JPEG"),
    _saved(picture(24, 40, seed=4), "GIF"), _saved(Image.new("RGB", (16, 16)), "EPS"),
    _saved(Image.new("I;16", (32, 16)), "PNG"), _saved(Image.new("RGB", (48, 32)), "TIFF"),
]
FLOATS = [0.0, -1.0, 0.5, 1.0, 1.5, 1e-20, 3.5, 100.0, 101.0, 1e308, math.inf, -math.inf, math.nan]
REQUEST_IDS = ["", "ok-1", "x" * 129, "bad id", "ü"]


def _fields(draw, message, choices: dict) -> None:
    """Set a random subset of `choices` (field -> strategy) on `message`."""
    for name, strategy in choices.items():
        if draw(st.booleans()):
            setattr(message, name, draw(strategy))


@st.composite
def encode_requests(draw) -> pb.EncodeRequest:
    request = pb.EncodeRequest(request_id=draw(st.sampled_from(REQUEST_IDS)),
                               prompt=draw(st.sampled_from(["", " ", "a cat", "ü" * 100, "\x00",
                                                           "x" * MAX_PROMPT_BYTES, "x" * (MAX_PROMPT_BYTES + 1)])))
    for _ in range(draw(st.integers(0, 3))):
        item = request.images.add(role=draw(st.sampled_from(["", "a", "b", "c"])),
                                  image=pb.ImageData(data=draw(st.sampled_from(IMAGES))))
        if draw(st.booleans()):
            item.focus.CopyFrom(pb.Focus(center_x=draw(st.sampled_from(FLOATS)), center_y=draw(st.sampled_from(FLOATS)),
                                         radius=draw(st.sampled_from(FLOATS))))
    _fields(draw, request, {"pixel_budget": st.sampled_from([0, 4 * 28 * 28 - 1, 4 * 28 * 28, 64 * 28 * 28,
                                                             16384 * 28 * 28 + 1, 2**32 - 1]),
                            "pad_to": st.sampled_from([0, 1, 64, 65536, 65537, 2**32 - 1])})
    return request


@st.composite
def control_map_requests(draw) -> pb.ControlMapsRequest:
    request = pb.ControlMapsRequest(request_id=draw(st.sampled_from(REQUEST_IDS)),
                                    image=pb.ImageData(data=draw(st.sampled_from(IMAGES))),
                                    kinds=draw(st.lists(st.sampled_from([0, 1, 2, 99]), max_size=3)),
                                    line_detector=draw(st.sampled_from([0, 1, 2, 3, 99])),
                                    resize_like_generator=draw(st.booleans()))
    _fields(draw, request, {"denoise_radius": st.sampled_from(FLOATS)})
    return request


def _mutated(draw, bundle: pb.EmbeddingBundle) -> pb.EmbeddingBundle:
    bundle = pb.EmbeddingBundle.FromString(bundle.SerializeToString())
    tokens = bundle.images[0].tokens
    mutation = draw(st.sampled_from(["none", "nan", "inf", "shape", "length", "dtype", "drop", "fingerprint",
                                     "pooled-shape", "bytes"]))
    if mutation == "nan":
        bundle.pooled.data = b"\x00\x00\xc0\x7f" * (len(bundle.pooled.data) // 4)
    elif mutation == "inf":
        tokens.tensor.data = b"\x00\x00\x80\xff" * (len(tokens.tensor.data) // 4)
    elif mutation == "shape":
        tokens.tensor.shape[:] = [draw(st.sampled_from([0, 1, 2**62])), 0, 3]
        tokens.tensor.data = b""
    elif mutation == "length":
        tokens.valid_length = draw(st.sampled_from([0, 2**31, 2**32 - 1]))
    elif mutation == "dtype":
        bundle.pooled.dtype = draw(st.sampled_from([0, 3, 99]))
    elif mutation == "drop":
        del bundle.images[:]
    elif mutation == "fingerprint":
        bundle.fingerprint.inner_dim = 7
    elif mutation == "pooled-shape":
        bundle.pooled.shape[:] = [2**62, 2**62, 0]
        bundle.pooled.data = b""
    elif mutation == "bytes":
        tokens.tensor.data = tokens.tensor.data[:-1]
    return bundle


@st.composite
def generate_requests(draw, bundle: pb.EmbeddingBundle) -> pb.GenerateRequest:
    params = pb.GenerationParams(width=draw(st.sampled_from([0, 16, 17, 32, 4112, 2**31])),
                                 height=draw(st.sampled_from([0, 16, 32, 1048560])))
    params.steps = draw(st.sampled_from([0, 1, 2, 2, 201, 2**31]))   # more than 2 valid steps cost too much here
    _fields(draw, params, {
        "seed": st.sampled_from([0, 1, 2**64 - 1]),
        "guidance": st.sampled_from(FLOATS), "strength": st.sampled_from(FLOATS),
        "image_count": st.sampled_from([0, 1, 2, 17]), "aspect_ratio": st.sampled_from(["1:1", "bogus", ""]),
        "depth": st.booleans(), "line": st.booleans(), "depth_strength": st.sampled_from(FLOATS),
        "line_strength": st.sampled_from(FLOATS), "corrected_controlnet": st.booleans()})
    request = pb.GenerateRequest(request_id=draw(st.sampled_from(REQUEST_IDS)),
                                 mode=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99])), bundle=_mutated(draw, bundle),
                                 params=params, mask_from_alpha=draw(st.booleans()))
    for name in ("init_image", "mask"):
        if draw(st.booleans()):
            getattr(request, name).data = draw(st.sampled_from(IMAGES))
    for _ in range(draw(st.integers(0, 3))):
        request.control_maps.add(kind=draw(st.sampled_from([0, 1, 2, 99])),
                                 image=pb.ImageData(data=draw(st.sampled_from(IMAGES))))
    request.output.format = draw(st.sampled_from([0, 1, 2, 3, 4, 99]))
    _fields(draw, request.output, {"png_compress_level": st.sampled_from([0, 9, 10]),
                                   "quality": st.sampled_from([0, 1, 100, 101]),
                                   "preview_every": st.sampled_from([0, 1, 201])})
    return request


@pytest.fixture(scope="module")
def abuse_bundle(client) -> pb.EmbeddingBundle:
    """Embeddings of a and b, so every mode has what it reads in the unmutated case."""
    return client.encode(picture(64, 48, seed=1), reference=picture(32, 32, seed=2), mode="controlnet")


def _status(call) -> grpc.StatusCode:
    try:
        response = call()
        if not isinstance(response, (pb.EncodeResponse, pb.ControlMapsResponse, pb.ServerInfo)):
            for _ in response:
                pass
    except grpc.RpcError as e:
        assert e.code() not in NEVER, f"{e.code().name}: {e.details()}"
        return e.code()
    return grpc.StatusCode.OK


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_requests_never_get_internal_and_the_servers_keep_serving(servers, client, abuse_bundle, data):
    rpc = data.draw(st.sampled_from(["Encode", "ComputeControlMaps", "Generate", "GetInfo"]))
    role = "generator" if rpc == "Generate" or (rpc == "GetInfo" and data.draw(st.booleans())) else "encoder"
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(servers[role].address, options) as channel:
        if rpc == "Encode":
            request = data.draw(encode_requests())
            _status(lambda: pb_grpc.EncoderStub(channel).Encode(request, timeout=DEADLINE))
        elif rpc == "ComputeControlMaps":
            request = data.draw(control_map_requests())
            _status(lambda: pb_grpc.EncoderStub(channel).ComputeControlMaps(request, timeout=DEADLINE))
        elif rpc == "Generate":
            request = data.draw(generate_requests(abuse_bundle))
            _status(lambda: pb_grpc.GeneratorStub(channel).Generate(request, timeout=DEADLINE))
        else:
            stub = pb_grpc.GeneratorStub(channel) if role == "generator" else pb_grpc.EncoderStub(channel)
            rid = data.draw(st.sampled_from(REQUEST_IDS))
            _status(lambda: stub.GetInfo(pb.GetInfoRequest(request_id=rid), timeout=DEADLINE))
    assert health(servers[role].address) == health_pb2.HealthCheckResponse.SERVING


def test_a_good_request_succeeds_after_the_abuse(servers, client, abuse_bundle):
    for role in ("encoder", "generator"):
        assert health(servers[role].address) == health_pb2.HealthCheckResponse.SERVING
    assert client.generate(client.encode(picture(48, 32, seed=9)), seed=1, steps=1, width=32, height=32).images
