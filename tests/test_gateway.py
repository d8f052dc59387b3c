"""The OpenAI-compatible HTTP gateway as a real uvicorn process in front of the real
servers, called with the official `openai` SDK and with httpx (what curl sends)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from qwen2vl_flux.client import AsyncClient
from qwen2vl_flux.client.images import image_bytes
from qwen2vl_flux.client.launch import ServerProcess
from qwen2vl_flux.gateway.images_api import Form, variation_job
from pictures import picture

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-gateway-test"
FAST = dict(steps=2, seed=5)
# Long enough to act mid-request on the tiny preset (512x512: a few seconds on two CPU cores).
SLOW = dict(steps=100, seed=9)


def png(image: Image.Image) -> bytes:
    return image_bytes(image)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


class Gateway:
    """`qwen2vl-flux-gateway` on a free loopback port, its JSON log in a file."""

    def __init__(self, encoder: str, generator: str, *args: str, scheme: str = "http", verify=True):
        self.dir = Path(tempfile.mkdtemp(prefix="qwen2vl-flux-gateway-", dir=ServerProcess.scratch_root))
        self.log_path = self.dir / "gateway.log"
        port_file = self.dir / "port"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "qwen2vl_flux.gateway", "--encoder", encoder, "--generator", generator,
                 "--port", "0", "--port-file", str(port_file), "--retry-after", "1", *args],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "the gateway did not bind"
            time.sleep(0.05)
        self.url = f"{scheme}://127.0.0.1:{port_file.read_text()}"
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, self.log_path.read_text()
                time.sleep(0.05)

    def sdk(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", KEY), timeout=120, **kwargs)

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
            if not labels and line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0 if wanted else float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def gateway(servers, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# one key a line\n{KEY}\nsk-second-key\n")
    gw = Gateway(servers["encoder"].address, servers["generator"].address, "--api-key-file", str(keys),
                 "--max-upload-bytes", "3000000", "--max-image-pixels", "4000000",
                 "--cors-origin", "http://ui.example", "--model-alias", "dall-e-2")
    yield gw
    gw.stop()


def _rgba_mask(size, box) -> bytes:
    """OpenAI's mask convention: transparent where to edit."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return png(mask)


IMAGE = picture(128, 128, seed=3)
BOX = (32, 32, 96, 96)


# ------------------------------------------------------------------ the SDK, happy paths

def test_variation_returns_n_images_of_the_size_asked(gateway):
    response = gateway.sdk().images.create_variation(image=("in.png", png(picture(100, 80)), "image/png"), n=2,
                                                     size="256x256", extra_body=FAST)
    assert len(response.data) == 2
    for item in response.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (256, 256)
    ours = response.model_extra["qwen2vl_flux"]
    assert ours["seed"] == 5 and ours["mode"] == "variation" and ours["model"] == "qwen2vl-flux"
    assert ours["parameters"]["image_count"] == 2 and ours["parameters"]["width"] == 256
    assert response.data[0].b64_json != response.data[1].b64_json


def test_variation_url_format_model_name_and_auto_size(gateway):
    sdk = gateway.sdk()
    response = sdk.images.create_variation(image=png(picture(100, 40)), model="qwen2vl-flux", response_format="url",
                                           size="96x48", extra_body=FAST)
    url = response.data[0].url
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (96, 48)
    # auto (or no size): the aspect-ratio entry nearest the input's shape
    for shape, ratio in (((100, 40), "2.4:1"), ((60, 80), "3:4"), ((64, 64), "1:1"), ((90, 160), "9:16")):
        form = Form(fields={"size": "auto"}, files={"image": [png(picture(*shape))]})
        assert variation_job(form, ("qwen2vl-flux",), 10**6).params["aspect_ratio"] == ratio
    alias = sdk.images.create_variation(image=png(picture(64, 64)), model="dall-e-2", size="64x64", extra_body=FAST)
    assert alias.model_extra["qwen2vl_flux"]["model"] == "qwen2vl-flux"
    assert [m.id for m in sdk.models.list().data] == ["qwen2vl-flux"]


def test_edit_keeps_the_unmasked_part_and_the_seed_repeats_it(gateway, client):
    sdk = gateway.sdk()
    params = dict(seed=4, steps=4, strength=0.9)
    edit = lambda mask: sdk.images.edit(image=("a.png", png(IMAGE), "image/png"), mask=("m.png", mask, "image/png"),
                                        prompt="a red disc", size="128x128", extra_body=params)
    first, second = edit(_rgba_mask((128, 128), BOX)), edit(_rgba_mask((128, 128), BOX))
    assert first.data[0].b64_json == second.data[0].b64_json              # same seed, same bytes
    assert first.model_extra["qwen2vl_flux"]["mask"] == "alpha"
    assert first.model_extra["qwen2vl_flux"]["mode"] == "inpaint"

    # The same request through the library, with a white = repaint mask: the same image.
    library_mask = Image.new("L", (128, 128), 0)
    library_mask.paste(255, BOX)
    library = client.inpaint(IMAGE, mask=library_mask, prompt="a red disc", **params)
    assert base64.b64decode(first.data[0].b64_json) == library.data[0]

    # A black/white mask that repaints nothing: what the edit leaves alone stays like it.
    nothing = edit(png(Image.new("L", (128, 128), 0)))
    assert nothing.model_extra["qwen2vl_flux"]["mask"] == "luminance"
    change = np.abs(pixels(base64.b64decode(first.data[0].b64_json))
                    - pixels(base64.b64decode(nothing.data[0].b64_json))).mean(axis=-1)
    inside = np.zeros((128, 128), bool)
    inside[40:88, 40:88] = True
    outside = np.ones((128, 128), bool)
    outside[16:112, 16:112] = False
    assert np.median(change[inside]) > 2 * np.median(change[outside])


def test_edit_without_mask_is_img2img_and_size_resizes_the_image(gateway):
    sdk = gateway.sdk()
    response = sdk.images.edit(image=png(picture(100, 80)), prompt="", size="256x256", output_format="webp",
                               extra_body=dict(FAST, steps=1))
    assert response.model_extra["qwen2vl_flux"]["mode"] == "img2img" and response.output_format == "webp"
    out = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
    assert out.format == "WEBP" and out.size == (256, 256) and response.size == "256x256"
    # An image with transparent pixels and no mask: its transparency is the mask (as in OpenAI's API).
    holed = picture(64, 64).convert("RGBA")
    holed.paste((0, 0, 0, 0), (16, 16, 48, 48))
    response = sdk.images.edit(image=png(holed), prompt="", extra_body=dict(FAST, steps=1))
    assert response.model_extra["qwen2vl_flux"]["mode"] == "inpaint"
    assert response.model_extra["qwen2vl_flux"]["mask"] == "image_alpha"
    # image[] twice: the input, then the reference image b (its embedding conditions FLUX), with a focus on b.
    a, b = png(picture(64, 64, seed=1)), png(picture(64, 64, seed=2))
    alone = sdk.images.edit(image=a, prompt="", extra_body=FAST)
    referenced = sdk.images.edit(image=[a, b], prompt="", extra_body=dict(FAST, focus={
        "center_x": 0.5, "center_y": 0.5, "radius": 0.4}))
    assert referenced.model_extra["qwen2vl_flux"]["focus"] == [0.5, 0.5, 0.4]
    assert referenced.data[0].b64_json != alone.data[0].b64_json


def test_streaming_edit_yields_partial_images_then_the_final_one(gateway):
    sdk = gateway.sdk()
    params = dict(seed=11, steps=4, strength=1.0)
    request = dict(image=png(IMAGE), mask=_rgba_mask((128, 128), BOX), prompt="", size="128x128")
    events = list(sdk.images.edit(stream=True, partial_images=2, extra_body=params, **request))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    preview = Image.open(io.BytesIO(base64.b64decode(events[0].b64_json)))
    assert preview.size == (32, 32) and events[0].size == "32x32"        # quarter size previews
    whole = sdk.images.edit(extra_body=params, **request)
    assert events[-1].b64_json == whole.data[0].b64_json and events[-1].size == "128x128"


def test_async_client_gives_the_sync_clients_images(servers, client):
    async def run():
        async with AsyncClient(servers["encoder"].address, servers["generator"].address, timeout=60) as aio:
            return await aio.variation(IMAGE, width=64, height=64, **FAST)

    assert asyncio.run(run()).data == client.variation(IMAGE, width=64, height=64, **FAST).data


def test_the_gateway_imports_no_torch():
    """It holds no model: its image installs the [gateway] extra only."""
    code = ("import sys, qwen2vl_flux.gateway.__main__; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ------------------------------------------------------------------ errors, as the SDK raises them

def test_bad_requests_are_400s_naming_the_field(gateway):
    sdk = gateway.sdk()
    image = png(picture(64, 64))
    cases = [
        (dict(size="100x100"), "size", "multiples of 16"),
        (dict(n=17), "n", "image_count must be an integer in 1..16"),
        (dict(model="dall-e-3"), "model", "'qwen2vl-flux'"),
        (dict(extra_body={"steps": 0}), "steps", "steps must be"),
        (dict(extra_body={"seeds": 3}), "seeds", "unknown field"),
    ]
    for kwargs, param, message in cases:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.images.create_variation(image=image, **kwargs)
        assert error.value.status_code == 400 and error.value.param == param and message in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        sdk.images.edit(image=image, prompt="x", size="2048x2048")
    assert error.value.param == "size" and "1.05 MP" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        sdk.images.edit(image=image, prompt="x", mask=png(Image.new("L", (32, 32))))
    assert error.value.param == "mask" and "must match" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        sdk.images.generate(prompt="a cat")
    assert "/v1/images/variations" in error.value.message and "/v1/images/edits" in error.value.message


def test_wrong_key_is_an_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as error:
        gateway.sdk(api_key="sk-wrong").images.create_variation(image=png(picture(64, 64)))
    assert "API key" in error.value.message and error.value.code == "invalid_api_key"
    missing = httpx.post(gateway.url + "/v1/images/variations", files={"image": ("a.png", b"x", "image/png")})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert gateway.sdk(api_key="sk-second-key").models.list().data      # every key in the file works


def _chunked_upload(size: int):
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(size // 100_000):
        yield b"\0" * 100_000


def test_upload_and_pixel_limits_are_checked_before_decoding(gateway):
    headers = {"authorization": f"Bearer {KEY}"}
    big = httpx.post(gateway.url + "/v1/images/variations", headers=headers,
                     files={"image": ("big.png", b"\0" * 3_100_000, "image/png")}, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "upload_too_large"
    chunked = httpx.post(gateway.url + "/v1/images/variations", timeout=30,     # no Content-Length: counted as read
                         headers=dict(headers, **{"content-type": "multipart/form-data; boundary=b"}),
                         content=_chunked_upload(4_000_000))
    assert chunked.status_code == 413 and "3000000 bytes" in chunked.json()["error"]["message"]
    wide = png(Image.new("RGB", (2500, 2000), (9, 9, 9)))          # 5 MP in a few kB
    assert len(wide) < 100_000
    refused = httpx.post(gateway.url + "/v1/images/variations", headers=headers,
                         files={"image": ("wide.png", wide, "image/png")}, timeout=30)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "image" and "4000000" in refused.json()["error"]["message"]


# ------------------------------------------------------------------ curl, health, metrics, CORS

def readme_curl() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- gateway-curl -->\s*```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_curl_request_works_with_httpx(gateway, tmp_path):
    """The README's curl command, sent field for field with httpx."""
    words = readme_curl()
    assert words[0] == "curl"
    url = next(w for w in words if w.startswith("http"))
    fields, files = {}, {}
    for flag, value in zip(words, words[1:]):
        if flag == "-F":
            name, value = value.split("=", 1)
            if value.startswith("@"):
                path = Path(value[1:])
                assert path.name == "photo.png"
                files[name] = (path.name, png(picture(96, 96)), "image/png")
            else:
                fields[name] = value
    assert any(w.startswith("Authorization: Bearer") for w in words)
    assert url.startswith("http://127.0.0.1:8000/")
    response = httpx.post(gateway.url + url.removeprefix("http://127.0.0.1:8000"), data=fields, files=files,
                          headers={"authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    size = tuple(int(v) for v in fields["size"].split("x"))
    assert [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in body["data"]] == \
        [size] * int(fields.get("n", 1))
    assert body["qwen2vl_flux"]["seed"] == int(fields["seed"])


def test_health_readiness_metrics_and_cors(gateway):
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert gateway.metric("qwen2vl_flux_requests_total", role="gateway", rpc="/v1/images/variations",
                          status="200") >= 1
    assert gateway.metric("qwen2vl_flux_requests_total", role="gateway", rpc="/v1/images/variations",
                          status="401") >= 1
    preflight = httpx.options(gateway.url + "/v1/images/edits", headers={
        "origin": "http://ui.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.options(gateway.url + "/v1/images/edits", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_https_with_its_own_certificate_and_a_deadline(servers, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, cwd=tmp_path)
    gw = Gateway(servers["encoder"].address, servers["generator"].address, "--https-cert", str(tmp_path / "cert.pem"),
                 "--https-key", str(tmp_path / "key.pem"), "--timeout", "1", scheme="https",
                 verify=str(tmp_path / "cert.pem"))
    try:
        assert gw.url.startswith("https://")
        assert httpx.get(gw.url + "/readyz", verify=str(tmp_path / "cert.pem"), timeout=10).status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(gw.url.replace("https://", "http://") + "/healthz", timeout=5)
        # A generation longer than the gateway's --timeout: DEADLINE_EXCEEDED is a 504, not replayed.
        # (closed before the gateway stops: an idle TLS connection holds up uvicorn's shutdown)
        with openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=str(tmp_path / "cert.pem"))) as sdk:
            with pytest.raises(openai.InternalServerError) as error:
                sdk.images.create_variation(image=png(IMAGE), size="512x512", extra_body=SLOW)
        assert error.value.status_code == 504 and "DEADLINE_EXCEEDED" in error.value.message
    finally:
        gw.stop()


# ------------------------------------------------------------------ a generator of its own: busy, killed, gone

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lonely(servers, tiny_checkpoints):
    """A generator that admits one request at a time (no queue), with metrics, and a gateway on it."""
    metrics_port = free_port()
    generator = ServerProcess("generator", tiny_checkpoints, "--max-queue", "0", "--metrics-port",
                              str(metrics_port)).start().wait_serving()
    gw = Gateway(servers["encoder"].address, generator.address)
    gw.generator, gw.generator_metrics = generator, f"http://127.0.0.1:{metrics_port}/metrics"
    yield gw
    gw.stop()
    generator.kill()


def _generator_metric(gw: Gateway, name: str) -> float:
    text = urllib.request.urlopen(gw.generator_metrics, timeout=5).read().decode()
    found = re.search(rf'^{name}\{{role="generator"\}} (\S+)', text, re.M)
    return float(found.group(1)) if found else 0.0


def _generator_busy(gw: Gateway, steps_before: float, timeout: float = 60) -> None:
    """Wait until the generator runs a request and has done a step of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (_generator_metric(gw, "qwen2vl_flux_in_flight") == 1
                and _generator_metric(gw, "qwen2vl_flux_denoise_step_seconds_count") > steps_before):
            return
        time.sleep(0.05)
    raise AssertionError("the generator never started the request")


def _generator_idle(gw: Gateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _generator_metric(gw, "qwen2vl_flux_in_flight") != 0:
        assert time.monotonic() < deadline, "the generator is still busy"
        time.sleep(0.05)


def _slow_variation(gw: Gateway, request_id: str, sdk=None):
    sdk = sdk or gw.sdk()
    pool = ThreadPoolExecutor(1)
    future = pool.submit(sdk.images.create_variation, image=png(IMAGE), size="512x512", extra_body=SLOW,
                         extra_headers={"x-request-id": request_id})
    pool.shutdown(wait=False)
    return future


def _wait_for_stopped(server: ServerProcess, request_id: str, timeout: float = 30) -> None:
    """The generator's model thread logs this when the denoise loop stopped for a cancelled call."""
    deadline = time.monotonic() + timeout
    while not any(e.get("msg") == "generation stopped" and e.get("request_id") == request_id
                  for e in server.log_records()):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)


def test_a_caller_that_disconnects_stops_the_generation(lonely):
    request = httpx.Request("POST", lonely.url + "/v1/images/variations", headers={"x-request-id": "gone-away"},
                            files={"image": ("a.png", png(IMAGE), "image/png")},
                            data={"size": "512x512", "steps": str(SLOW["steps"]), "seed": "1"})
    body = request.read()
    steps = _generator_metric(lonely, "qwen2vl_flux_denoise_step_seconds_count")
    with socket.create_connection(("127.0.0.1", int(lonely.url.rsplit(":", 1)[1]))) as raw:
        head = "POST /v1/images/variations HTTP/1.1\r\nHost: gateway\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host") + "\r\n"
        raw.sendall(head.encode() + body)
        _generator_busy(lonely, steps)
    # The socket is closed mid-generation: the gateway cancels the call, the generator stops the job.
    _wait_for_stopped(lonely.generator, "gone-away")
    assert any(e.get("msg") == "generation cancelled" and e.get("request_id") == "gone-away" for e in lonely.log())
    assert lonely.metric("qwen2vl_flux_gateway_disconnects_total") == 1


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(lonely):
    stream = httpx.stream("POST", lonely.url + "/v1/images/edits", timeout=120, headers={"x-request-id": "occupant"},
                          files={"image": ("a.png", png(IMAGE), "image/png")},
                          data={"stream": "true", "size": "512x512", "steps": str(SLOW["steps"]), "strength": "1"})
    with stream as occupant:
        assert occupant.status_code == 200         # the status waits for the first step: it runs now
        with pytest.raises(openai.RateLimitError) as error:
            lonely.sdk().images.create_variation(image=png(IMAGE), size="64x64", extra_body=FAST)
        assert "busy" in error.value.message and error.value.code == "resource_exhausted"
        assert error.value.response.headers["retry-after"] == "1"
        assert error.value.response.headers["x-should-retry"] == "true"
    # Leaving the stream cancelled the occupant; the generator is free again.
    _generator_idle(lonely)
    _wait_for_stopped(lonely.generator, "occupant")
    assert lonely.sdk().images.create_variation(image=png(IMAGE), size="64x64", extra_body=FAST).data


def test_a_generation_that_fails_midway_is_not_replayed(lonely):
    """With the SDK's default retries (2): the generator dies mid-run, the answer says
    x-should-retry: false, and the gateway saw the request once."""
    before = lonely.metric("qwen2vl_flux_requests_total", role="gateway", rpc="/v1/images/variations", status="503")
    _generator_idle(lonely)
    steps = _generator_metric(lonely, "qwen2vl_flux_denoise_step_seconds_count")
    running = _slow_variation(lonely, "killed-midway", sdk=lonely.sdk(max_retries=2))
    _generator_busy(lonely, steps)
    lonely.generator.kill()
    with pytest.raises(openai.InternalServerError) as error:
        running.result(timeout=60)
    assert error.value.status_code == 503 and error.value.response.headers["x-should-retry"] == "false"
    assert "generator" in error.value.message and "UNAVAILABLE" in error.value.message
    after = lonely.metric("qwen2vl_flux_requests_total", role="gateway", rpc="/v1/images/variations", status="503")
    assert after - before == 1


def test_a_stopped_generator_is_a_503_and_not_ready(lonely):
    lonely.generator.kill()
    with pytest.raises(openai.InternalServerError) as error:
        lonely.sdk().images.create_variation(image=png(IMAGE), size="64x64", extra_body=FAST)
    assert error.value.status_code == 503
    assert "generator at" in error.value.message and "UNAVAILABLE" in error.value.message
    ready = httpx.get(lonely.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and "generator" in ready.json()["error"]


def test_a_generator_lost_mid_stream_is_an_error_event(lonely):
    """Restarted, the generator is found again (ready); killed while a stream runs, the stream
    ends with an `error` event in OpenAI's shape, which the SDK raises."""
    lonely.generator.start().wait_serving()
    deadline = time.monotonic() + 30
    while httpx.get(lonely.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not find the restarted generator"
        time.sleep(0.2)
    steps = _generator_metric(lonely, "qwen2vl_flux_denoise_step_seconds_count")
    stream = lonely.sdk().images.edit(image=png(IMAGE), prompt="", stream=True, size="512x512",
                                      extra_body=dict(SLOW, strength=1.0))
    _generator_busy(lonely, steps)
    lonely.generator.kill()
    with pytest.raises(openai.APIError) as error:
        list(stream)
    assert not isinstance(error.value, openai.APIStatusError)      # the status was 200: an event, not a status
    assert "generator at" in error.value.message and "UNAVAILABLE" in error.value.message
    assert error.value.type == "server_error" and error.value.code == "unavailable"
