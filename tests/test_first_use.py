"""A newcomer's first hour: `qwen2vl-flux serve` on the default addresses (from the
environment) and `generate` against them with no address or size, the servers' stderr
as pure JSON from start to stop, and error messages that say what to do."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from qwen2vl_flux.client import Client, InvalidArgument
from qwen2vl_flux.client.api import ServiceError
from qwen2vl_flux.client.cli import DEMO_INPUT
from pictures import picture

CLI = [sys.executable, "-m", "qwen2vl_flux.client.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_then_generate_on_its_default_addresses_with_json_logs(tmp_path):
    encoder, generator = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, QWEN2VL_FLUX_ENCODER=encoder, QWEN2VL_FLUX_GENERATOR=generator, TMPDIR=str(scratch))
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        serve = subprocess.Popen([*CLI, "serve", "--log-format", "json"], env=env, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops both" not in out.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        assert f"encoder on {encoder}, generator on {generator}" in out.read_text()
        made = subprocess.run([*CLI, "generate", "--input", str(DEMO_INPUT), "--out", str(tmp_path / "images"),
                               "--steps", "2", "--seed", "5"], env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        with Image.open(made.stdout.split()[0]) as image:
            assert image.size == (128, 128)     # the demo model's native size, no size given
        assert f"seed 5; the same again: qwen2vl-flux generate --input {DEMO_INPUT}" in made.stderr
        first = Path(made.stdout.split()[0])
        kept = first.read_bytes()
        # The same seed with other parameters: a new file beside the first, which stays as it was.
        other = subprocess.run([*CLI, "generate", "--input", str(DEMO_INPUT), "--out", str(tmp_path / "images"),
                                "--steps", "1", "--seed", "5"], env=env, capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == [str(first.with_name(f"{DEMO_INPUT.stem}-5-r2-0.png"))]
        assert first.read_bytes() == kept and Path(other.stdout.split()[0]).read_bytes() != kept
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(60)
    assert code == 0
    assert not list(scratch.glob("qwen2vl-flux-*"))   # the servers' port-file directories are gone

    lines = err.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on the servers' stderr: {line!r}")
    assert all(isinstance(r, dict) and {"ts", "level", "role", "msg"} <= set(r) for r in records)
    for role, rpc in (("encoder", "Encode"), ("generator", "Generate")):
        events = [r["msg"] for r in records if r["role"] == role]
        assert [e for e in events if e in ("listening", "serving", "draining", "stopped")] == \
            ["listening", "serving", "draining", "stopped"], events
        assert any(r["msg"] == "rpc done" and r["rpc"] == rpc for r in records if r["role"] == role)
    line_auto = next(r for r in records if r["msg"] == "control maps")
    assert line_auto["line_auto"] == "canny" and "auto uses canny" in line_auto["note"]

    # Stopped: the same command now says what is wrong and how to start the servers.
    again = subprocess.run([*CLI, "generate", "--input", str(DEMO_INPUT), "--out", str(tmp_path / "images")],
                           env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert f"is the encoder running at {encoder}? start both servers with `qwen2vl-flux serve`" in again.stderr
    assert "denoise" not in again.stderr     # no empty progress bar before an early error


def test_unavailable_names_the_address_and_how_to_start_it():
    address = f"127.0.0.1:{_free_port()}"
    with Client(encoder=address, generator=address, timeout=10) as client:
        with pytest.raises(ServiceError) as error:
            client.encode(picture(32, 32))
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"is the encoder running at {address}?" in str(error.value)
    assert f"qwen2vl-flux-encoder --checkpoints DIR --port {address.rsplit(':', 1)[1]}" in str(error.value)


def test_an_unreadable_file_is_named_and_so_is_an_unreadable_upload(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    with pytest.raises(InvalidArgument, match=f"{text} is not an image file"):
        client.variation(str(text), steps=1)
    bundle = client.encode(picture(32, 32), mode="img2img")
    with pytest.raises(ServiceError) as error:
        client.generate(bundle, mode="img2img", image=b"not a picture either", steps=1)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "init_image is not a readable image" in error.value.details and "BytesIO" not in error.value.details


def _rect_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def test_one_mask_rule_resize_to_image_a_or_refuse_naming_both_sizes(client):
    a = picture(100, 80, seed=3)
    common = dict(seed=4, steps=2, strength=0.5)
    big = _rect_mask(200, 160)          # image a's shape, twice its size
    resized_first = client.inpaint(a, mask=big.resize((100, 80), Image.LANCZOS), **common).images[0]
    served = client.inpaint(a, mask=big, **common).images[0]
    assert np.array_equal(np.asarray(served), np.asarray(resized_first))
    with pytest.raises(ServiceError) as error:
        client.inpaint(a, mask=_rect_mask(100, 50), **common)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mask is 100x50 but image a is 100x80" in error.value.details


def test_every_help_shows_its_defaults(capsys, monkeypatch):
    from qwen2vl_flux.client.cli import main
    from qwen2vl_flux.serving.server import base_parser

    monkeypatch.delenv("QWEN2VL_FLUX_ENCODER", raising=False)
    monkeypatch.delenv("QWEN2VL_FLUX_GENERATOR", raising=False)
    expected = {"serve": ["(default: 127.0.0.1:50051)", "(default: 127.0.0.1:50052)", "(default: text)",
                          "QWEN2VL_FLUX_ENCODER"],
                "generate": ["(default: 127.0.0.1:50051)", "(default: 127.0.0.1:50052)", "(default: 28)",
                             "default: 3.5", "(default: 0.8)", "(default: 600.0)", "QWEN2VL_FLUX_GENERATOR"],
                "demo": ["(default: 28)", "(default: out)"]}
    for command, needles in expected.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (command, needle)
    server_help = " ".join(base_parser("generator", 50052).format_help().split())
    assert "(default: 50052)" in server_help and "(default: 127.0.0.1)" in server_help
    assert "(default: json)" in server_help and "(default: None)" not in server_help
