"""Property-based abuse of the real tiny servers through the raw stubs: random and boundary
requests of every RPC never get INTERNAL or UNKNOWN, both servers stay SERVING, and a good
request succeeds afterwards. Half the examples are careful callers' requests that reach the
model, half mix in hostile values. Each is cheap by construction (images of at most 64 px,
sizes of at most 32 px, 2 steps, 2 images) and has a short deadline; 80 examples take about
1.5 minutes on the CI machine (QWEN2VL_FLUX_ABUSE_EXAMPLES changes the count)."""
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

EXAMPLES = int(os.environ.get("QWEN2VL_FLUX_ABUSE_EXAMPLES", "80"))
DEADLINE = 20.0
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _saved(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


_RGBA = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
# Decodable, at least 16 px a side, aspect ratio <= 8: what a careful caller sends.
GOOD_IMAGES = [
    image_bytes(picture(64, 48, seed=1)), image_bytes(picture(32, 32, seed=2)), image_bytes(Image.new("RGB", (16, 16))),
    image_bytes(_RGBA), _saved(picture(40, 24, seed=3), "JPEG"), _saved(picture(24, 40, seed=4), "GIF"),
    _saved(Image.new("I;16", (32, 16)), "PNG"), _saved(Image.new("RGB", (48, 32)), "TIFF"),
]
BAD_IMAGES = [
    b"", b"garbage bytes", image_bytes(picture(64, 48, seed=1))[:60], image_bytes(Image.new("RGB", (1, 1))),
    image_bytes(Image.new("RGB", (15, 15))), image_bytes(Image.new("RGB", (1, 300))),
    image_bytes(Image.new("RGB", (40, 3))), image_bytes(Image.new("1", (8000, 8000))),
    _saved(Image.new("RGB", (16, 16)), "EPS"),
]
GOOD_FLOATS, BAD_FLOATS = [0.0, 0.5, 1.0], [-1.0, 1.5, 1e-20, 101.0, 1e308, math.inf, -math.inf, math.nan]
GOOD_IDS, BAD_IDS = ["", "ok-1"], ["x" * 129, "bad id", "ü"]


class Chooser:
    """Half the examples draw only what a careful caller sends (they reach the model), the
    other half mix in boundary and hostile values."""

    def __init__(self, draw):
        self.draw, self.valid = draw, draw(st.booleans())

    def __call__(self, good: list, bad: list = ()):
        return self.draw(st.sampled_from(list(good) if self.valid or not bad else list(good) + list(bad)))

    def maybe(self) -> bool:
        return self.draw(st.booleans())


@st.composite
def encode_requests(draw) -> pb.EncodeRequest:
    pick = Chooser(draw)
    request = pb.EncodeRequest(request_id=pick(GOOD_IDS, BAD_IDS),
                               prompt=pick(["", "a cat", "ü" * 100, "x" * MAX_PROMPT_BYTES],
                                           [" ", "\x00", "x" * (MAX_PROMPT_BYTES + 1)]))
    count = pick([1, 2], [0, 3])
    roles = pick([["a", "b"], ["", ""], ["b", "a"]], [["a", "a"], ["c", "b"], ["", "c"]])
    for i in range(count):
        item = request.images.add(role=roles[i % 2], image=pb.ImageData(data=pick(GOOD_IMAGES, BAD_IMAGES)))
        if pick.maybe():
            item.focus.CopyFrom(pb.Focus(center_x=pick(GOOD_FLOATS, BAD_FLOATS), center_y=pick(GOOD_FLOATS, BAD_FLOATS),
                                         radius=pick([0.3, 1.0], [0.0] + BAD_FLOATS)))
    if pick.maybe():
        request.pixel_budget = pick([4 * 28 * 28, 64 * 28 * 28], [0, 4 * 28 * 28 - 1, 16384 * 28 * 28 + 1, 2**32 - 1])
    if pick.maybe():
        request.pad_to = pick([256, 1024], [0, 1, 65537, 2**32 - 1])
    return request


@st.composite
def control_map_requests(draw) -> pb.ControlMapsRequest:
    pick = Chooser(draw)
    image = pb.ImageData(data=pick(GOOD_IMAGES, BAD_IMAGES))
    request = pb.ControlMapsRequest(request_id=pick(GOOD_IDS, BAD_IDS), image=image,
                                    kinds=pick([[], [pb.DEPTH], [pb.LINE], [pb.DEPTH, pb.LINE]],
                                               [[0], [99], [1, 1, 2]]),
                                    line_detector=pick([0, 1, 2, 3], [99]), resize_like_generator=pick.maybe())
    if pick.maybe():
        request.denoise_radius = pick([0.0, 1.5], [-1.0, 101.0, math.inf, math.nan])
    return request


def _mutated(pick: Chooser, bundle: pb.EmbeddingBundle) -> pb.EmbeddingBundle:
    bundle = pb.EmbeddingBundle.FromString(bundle.SerializeToString())
    tokens = bundle.images[0].tokens
    mutation = pick(["none"], ["nan", "inf", "shape", "length", "dtype", "drop", "fingerprint", "pooled-shape",
                               "bytes"])
    if mutation == "nan":
        bundle.pooled.data = b"\x00\x00\xc0\x7f" * (len(bundle.pooled.data) // 4)
    elif mutation == "inf":
        tokens.tensor.data = b"\x00\x00\x80\xff" * (len(tokens.tensor.data) // 4)
    elif mutation == "shape":
        tokens.tensor.shape[:] = [pick([0, 1, 2**62]), 0, 3]
        tokens.tensor.data = b""
    elif mutation == "length":
        tokens.valid_length = pick([0, 2**31, 2**32 - 1])
    elif mutation == "dtype":
        bundle.pooled.dtype = pick([0, 3, 99])
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
    pick = Chooser(draw)
    # Valid sizes stay at most 32 px and valid steps at most 2: cheap on the tiny model.
    params = pb.GenerationParams(width=pick([16, 32], [0, 17, 4112, 2**31]), height=pick([16, 32], [0, 1048560]),
                                 steps=pick([1, 2], [0, 201, 2**31]))
    for name, good, bad in (("seed", [0, 1, 2**64 - 1], []), ("guidance", [0.0, 3.5, 100.0], BAD_FLOATS),
                            ("strength", [0.5, 1.0], [0.0] + BAD_FLOATS), ("image_count", [1, 2], [0, 17]),
                            ("aspect_ratio", ["1:1"], ["bogus", ""]), ("depth", [True, False], []),
                            ("line", [True, False], []), ("depth_strength", GOOD_FLOATS, BAD_FLOATS),
                            ("line_strength", GOOD_FLOATS, BAD_FLOATS), ("corrected_controlnet", [True, False], [])):
        if pick.maybe():
            setattr(params, name, pick(good, bad))
    request = pb.GenerateRequest(request_id=pick(GOOD_IDS, BAD_IDS), mode=pick([1, 2, 3, 4, 5], [0, 99]),
                                 bundle=_mutated(pick, bundle), params=params)
    init = pick(GOOD_IMAGES, BAD_IMAGES)
    if request.mode != pb.VARIATION or pick.maybe():
        request.init_image.data = init
    if pick.maybe():
        request.mask_from_alpha = init == image_bytes(_RGBA) or not pick.valid
    elif request.mode in (pb.INPAINT, pb.CONTROLNET_INPAINT) or pick.maybe():
        request.mask.data = init if pick.valid else pick(GOOD_IMAGES, BAD_IMAGES)   # the same size as image a
    kinds = pick([[pb.DEPTH, pb.LINE], [pb.LINE, pb.DEPTH]], [[], [pb.DEPTH], [0], [99], [1, 1, 2]])
    for kind in kinds:
        request.control_maps.add(kind=kind, image=pb.ImageData(data=pick(GOOD_IMAGES, BAD_IMAGES)))
    request.output.format = pick([0, 1, 2, 3, 4], [99])
    if pick.maybe():
        request.output.png_compress_level = pick([0, 9], [10])
    if pick.maybe():
        request.output.quality = pick([1, 100], [0, 101])
    if pick.maybe():
        request.output.preview_every = pick([0, 1], [201])
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
            rid = data.draw(st.sampled_from(GOOD_IDS + BAD_IDS))
            _status(lambda: stub.GetInfo(pb.GetInfoRequest(request_id=rid), timeout=DEADLINE))
    assert health(servers[role].address) == health_pb2.HealthCheckResponse.SERVING


def test_a_good_request_succeeds_after_the_abuse(servers, client, abuse_bundle):
    for role in ("encoder", "generator"):
        assert health(servers[role].address) == health_pb2.HealthCheckResponse.SERVING
    assert client.generate(client.encode(picture(48, 32, seed=9)), seed=1, steps=1, width=32, height=32).images
