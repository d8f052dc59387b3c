"""GPU tests (`pytest -m gpu`; skipped without CUDA): full-size random weights, every
mode at 1024x1024, encoder and generator as two processes on two GPUs (and both on
one). Eager, to keep the run short, but for one compiled turbo generator restarted on its
compile cache, and the compiled path's fused products and strided attention at a block's
shapes; bench/ measures the compiled paths' speed."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_flux.client import Client
from qwen2vl_flux.client.launch import ServerProcess
from qwen2vl_flux.generator_server.blocks import ConcatFreeLinear, LinearGeluTanh, strided_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PICTURE = Image.new("RGB", (1024, 1024), (90, 140, 200))
MASK = Image.new("L", (1024, 1024), 0)
MASK.paste(255, (256, 256, 768, 768))
MODES = ["variation", "img2img", "inpaint", "controlnet", "controlnet-inpaint"]
PEAKS: dict[str, dict] = {}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tiny_checkpoints, layout: dict[str, str], generator_flags: tuple[str, ...] = ()):
    servers = {}
    for role, device in layout.items():
        port = _port()
        extra = ["--random-weights", "full", "--device", device, "--metrics-port", str(port)]
        if role == "generator":
            extra += ["--no-compile", "--warm-up", "none", *generator_flags]
        servers[role] = (ServerProcess(role, tiny_checkpoints, *extra), port)
    for server, _ in servers.values():
        server.start()
    for server, _ in servers.values():
        server.wait_serving(timeout=600)
    return servers


def _memory(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.findall(r'qwen2vl_flux_gpu_memory_bytes\{device="(\d+)",kind="(\w+)",role="\w+"\} ([\d.e+]+)', text)
    return {f"cuda:{d} {kind}": float(v) for d, kind, v in found}


def _gpu_processes() -> dict[int, set[str]]:
    """pid -> GPU uuids it holds memory on, as the driver sees it (empty if pids are hidden)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError:
        return {}
    held: dict[int, set[str]] = {}
    for line in out.strip().splitlines():
        pid, uuid = (x.strip() for x in line.split(","))
        held.setdefault(int(pid), set()).add(uuid)
    return held


def _run_every_mode(client: Client) -> dict[str, bytes]:
    images = {}
    for mode in MODES:
        kwargs = dict(seed=1, steps=4)
        if mode == "variation":
            kwargs["aspect_ratio"] = "1:1"
        if mode.endswith("inpaint"):
            kwargs["mask"] = MASK
        if mode.startswith("controlnet"):
            kwargs["control_maps"] = {"depth": PICTURE, "line": PICTURE}
        result = client.run(mode, PICTURE, prompt="a photo", **kwargs)
        assert [im.size for im in result.images] == [(1024, 1024)], mode
        images[mode] = result.images[0].tobytes()
    return images


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_every_mode_each_process_on_its_own_gpu(tiny_checkpoints):
    servers = _start(tiny_checkpoints, {"encoder": "cuda:0", "generator": "cuda:1"})
    try:
        client = Client(servers["encoder"][0].address, servers["generator"][0].address, timeout=600)
        _run_every_mode(client)
        control = client.control_maps(PICTURE)
        assert set(control.maps) == {"depth", "line"}
        memory = {role: _memory(port) for role, (_, port) in servers.items()}
        PEAKS["two GPUs"] = memory
        assert memory["encoder"]["cuda:0 peak_allocated"] > 10e9 and not any("cuda:1" in k for k in memory["encoder"])
        assert memory["generator"]["cuda:1 peak_allocated"] > 20e9 and not any("cuda:0" in k for k in memory["generator"])
        held = _gpu_processes()
        # CUDA's device order need not be nvidia-smi's: name the GPUs as CUDA numbers them.
        uuid = {i: f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(2)}
        if held:   # the driver shows pids on this host: check from outside too
            seen = {role: held.get(server.pid) for role, (server, _) in servers.items()}
            assert seen == {"encoder": {uuid[0]}, "generator": {uuid[1]}}, (seen, uuid, held)
    finally:
        for server, _ in servers.values():
            server.stop()
    print("\nPEAK", json.dumps(PEAKS))


def _step_graph_events(server) -> list[str]:
    return [line["msg"] for line in server.log_records() if line["msg"].startswith("step graph")]


@pytest.mark.parametrize("flags", [(), ("--cuda-graphs", "8"), ("--turbo", "--step-cache", "fixed:2", "--cuda-graphs", "8")],
                         ids=["lossless", "lossless-graphs", "turbo-graphs"])
def test_one_gpu_both_halves(tiny_checkpoints, flags):
    """Every mode; with CUDA graphs three times, the same images each time, bitwise. Modes whose
    inputs have the same shapes share a key, so in the first pass only the first of them runs
    without a graph; the ControlNet modes' keys differ from the others' (their maps)."""
    graphs = "--cuda-graphs" in flags
    servers = _start(tiny_checkpoints, {"encoder": "cuda:0", "generator": "cuda:0"}, flags)
    try:
        client = Client(servers["encoder"][0].address, servers["generator"][0].address, timeout=600)
        runs = [_run_every_mode(client) for _ in range(3 if graphs else 1)]
        for mode in MODES:
            assert all(run[mode] == runs[0][mode] for run in runs), mode
        events = _step_graph_events(servers["generator"][0])
        if graphs:
            _check_graph_events(servers["generator"], events, "--turbo" in flags, client)
        else:
            assert not events and client.info()["generator"].startup.cuda_graphs == 0
        PEAKS["one GPU" + (" graphs" if graphs else "") + (" turbo" if "--turbo" in flags else "")] = {
            role: _memory(port) for role, (_, port) in servers.items()}
    finally:
        for server, _ in servers.values():
            server.stop()
    print("\nPEAK", json.dumps(PEAKS))


def _check_graph_events(generator, events: list[str], turbo: bool, client: Client) -> None:
    """Captures logged and none failed, as the generator's metrics and GetInfo say too."""
    assert not any("failed" in e for e in events) and events.count("step graph captured") >= 2, events
    text = urllib.request.urlopen(f"http://127.0.0.1:{generator[1]}/metrics", timeout=10).read().decode()
    counts = dict(re.findall(r'qwen2vl_flux_step_graphs_total\{result="(\w+)",role="generator"\} ([\d.e+]+)', text))
    assert float(counts["captured"]) == events.count("step graph captured") and float(counts["replayed"]) > 0 \
        and float(counts["failed"]) == 0, counts
    startup = client.info()["generator"].startup
    assert startup.turbo == turbo and startup.cuda_graphs == 8


def test_one_gpu_compiled_turbo_restarts_on_its_compile_cache(tiny_checkpoints, tmp_path):
    """Compiled turbo (the speed options a user turns on) serves every mode; restarted on the
    same --compile-cache it loads every block graph precompiled (ControlNet's included, compiled
    on first use by the first start) and paints the same images, within kernel rounding."""
    flags = ("--compile", "--turbo", "--warm-up", "variation", "--compile-cache", str(tmp_path / "cache"))
    servers = _start(tiny_checkpoints, {"encoder": "cuda:0", "generator": "cuda:0"}, flags)
    try:
        client = Client(servers["encoder"][0].address, servers["generator"][0].address, timeout=600)
        startup = client.info()["generator"].startup
        assert startup.compiled and startup.turbo and startup.compile_cache == "saved", startup
        first = _run_every_mode(client)
        generator = servers["generator"][0]
        generator.stop(120)
        generator.start().wait_serving(timeout=600)
        startup = client.info()["generator"].startup
        assert startup.compile_cache == "hit" and re.search(r"\d+ loaded", startup.compile_cache_detail) \
            and not re.search(r"\d+ compiled", startup.compile_cache_detail), startup
        # Not bitwise: the restart re-runs Inductor's autotuning, which may pick other kernel
        # configurations (other summation orders); a graph that did not fit would paint noise.
        again = _run_every_mode(client)
        for mode in MODES:
            a, b = (np.frombuffer(x[mode], np.uint8).astype(np.float64) for x in (first, again))
            psnr = 10 * np.log10(255 ** 2 / max(np.mean((a - b) ** 2), 1e-12))
            assert psnr > 40, (mode, psnr, np.abs(a - b).max())
        assert not re.search(r"\d+ compiled", client.info()["generator"].startup.compile_cache_detail)
    finally:
        for server, _ in servers.values():
            server.stop()


def test_step_graphs_replay_the_compiled_steps_bitwise(tiny_checkpoints):
    """The compiled generator (modulation rows ahead, precompiled blocks) with CUDA graphs: a
    variation and a ControlNet request paint what they paint without graphs, bitwise, on the
    request that meets a shape, the one that captures it and the one that replays it, and a
    replayed request with other inputs of the same shapes (seed, embeddings, guidance) paints
    its own image. One graph kept: the ControlNet's (its maps' modes and scales in its key)
    evicts the variation's, which a later request captures again."""
    from qwen2vl_flux.client.modes import Mode, resolve_parameters
    from qwen2vl_flux.generator_server.pipeline import Conditioning, FluxGenerator, GenerationJob, SpeedOptions

    generator = FluxGenerator(tiny_checkpoints, device="cuda", dtype=torch.bfloat16, random_weights="full")
    try:
        generator.optimize(SpeedOptions(compile=True, attention="_native_cudnn", cuda_graphs=1))
        graphs, cfg = generator.step_graphs, generator.fingerprint
        torch.manual_seed(0)

        def conditioning() -> Conditioning:
            tokens = torch.randn(1, 320, cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16)
            return Conditioning({"a": tokens, "b": tokens.flip(1)},
                                torch.randn(1, 256, cfg.inner_dim, device="cuda", dtype=torch.bfloat16),
                                torch.randn(1, cfg.pooled_dim, device="cuda", dtype=torch.bfloat16))
        cond, other = conditioning(), conditioning()
        picture = PICTURE.resize((512, 512))
        jobs = {"variation": (Mode.VARIATION, {"aspect_ratio": "1:1"}), "controlnet": (Mode.CONTROLNET, {})}

        def paint(name: str, seed: int = 3, conditioning: Conditioning = cond, guidance: float = 3.5) -> bytes:
            mode, extra = jobs[name]
            params, _ = resolve_parameters(mode, {"seed": seed, "steps": 3, "guidance": guidance, **extra})
            job = GenerationJob(mode, params, conditioning, init_image=picture,
                                control_maps={"depth": picture, "line": picture.rotate(90)})
            return b"".join(im.tobytes() for im in generator.generate(job))

        generator.step_graphs = None
        plain = {name: paint(name) for name in jobs}
        plain_other = paint("controlnet", 4, other, 5.0)
        assert plain_other != plain["controlnet"]
        generator.step_graphs = graphs
        for name in jobs:
            captures = graphs.captures
            assert paint(name) == plain[name], name            # meets its shape
            assert graphs.captures == captures
            replays = graphs.replays
            assert paint(name) == plain[name], name            # captures (then replays each step)
            calls = graphs.replays - replays                   # 3 steps; the ControlNet's strength runs 2
            assert graphs.captures == captures + 1 and len(graphs.graphs) == 1 and calls >= 2
            replays = graphs.replays
            assert paint(name) == plain[name], name            # replays
            assert graphs.captures == captures + 1 and graphs.replays == replays + calls
        assert paint("controlnet", 4, other, 5.0) == plain_other     # replayed on other inputs
        assert paint("variation") == plain["variation"] and graphs.captures == 3 and not graphs.failed
    finally:
        generator = None
        torch.cuda.empty_cache()


def test_a_failed_step_graph_capture_turns_graphs_off_and_leaves_the_stream_as_it_was():
    """A call that syncs with the host cannot be captured: its result comes from a plain call,
    the caller is back on its own stream, graphs are off for the process, and later calls
    compute what they compute without graphs."""
    from qwen2vl_flux.generator_server.step_graphs import StepGraphs

    graphs, stream = StepGraphs(2), torch.cuda.current_stream()

    def call(x):
        return x * float(x.sum().item())   # .item() waits for the GPU: illegal while capturing

    x = torch.arange(6.0, device="cuda")
    graphs.new_request()
    assert torch.equal(graphs.run(call, (), {"x": x}), call(x)) and graphs.captures == 0
    graphs.new_request()
    assert torch.equal(graphs.run(call, (), {"x": x}), call(x))   # the capture fails; a plain call answers
    assert graphs.failed == 1 and not graphs.graphs and torch.cuda.current_stream() == stream
    graphs.new_request()
    y = x + 1
    assert torch.equal(graphs.run(call, (), {"x": y}), call(y)) and graphs.captures == 0
    assert torch.equal((y @ y).cpu(), torch.tensor(float(sum((i + 1) ** 2 for i in range(6)))))


def test_fused_products_at_a_single_blocks_shapes_are_the_stock_layers_to_rounding():
    """cuBLASLt's GELU epilogue (the CPU tests run the plain GELU) is the tanh GELU, and proj_out
    as two products is the product of the concatenation. Against float64: in fp32 the tanh and the
    exact GELU differ by far more than the epilogue rounds; in bf16 both fused layers are about as
    far off as diffusers' (the split sum rounds once more: 1.3 x the error on the CPU in bf16).
    fp32 layers keep torch's GELU: the epilogue's was 2.7 x further off in fp32 (H100, 1.2e-6
    against 4.5e-7 mean), which is not fp32's precision."""
    torch.manual_seed(0)
    dim, hidden, gelu = 3072, 12288, torch.nn.functional.gelu

    def error(t: torch.Tensor, reference: torch.Tensor) -> float:
        return (t.double() - reference).abs().mean().item()

    for dtype in (torch.float32, torch.bfloat16):
        up = torch.nn.Linear(dim, hidden, device="cuda", dtype=dtype)
        out = torch.nn.Linear(dim + hidden, dim, device="cuda", dtype=dtype)
        x, attn = (2 * torch.randn(1, 4608, dim, device="cuda", dtype=dtype) for _ in range(2))
        with torch.inference_mode():
            before = x.double() @ up.weight.double().t() + up.bias.double()
            tanh, erf = gelu(before, approximate="tanh"), gelu(before)
            stock_mlp, fused_mlp = gelu(up(x), approximate="tanh"), LinearGeluTanh(up)(x)
            exact = torch.cat([attn, stock_mlp], -1).double() @ out.weight.double().t() + out.bias.double()
            stock, fused = out(torch.cat([attn, stock_mlp], -1)), ConcatFreeLinear(out, dim)(attn, stock_mlp)
        assert fused_mlp.shape == stock_mlp.shape and fused.shape == stock.shape
        if dtype == torch.float32:   # the epilogue's form; fp32 layers keep torch's GELU
            with torch.inference_mode():
                epilogue = torch._addmm_activation(up.bias, x[0], up.weight.t(), use_gelu=True)
            assert error(epilogue, tanh[0]) < error(epilogue, erf[0]) / 10, (error(epilogue, tanh[0]),
                                                                            error(epilogue, erf[0]))
            torch.testing.assert_close(fused_mlp, stock_mlp, rtol=1e-6, atol=1e-6)
        else:
            assert error(fused_mlp, tanh) <= 1.5 * error(stock_mlp, tanh), (dtype, error(stock_mlp, tanh))
        assert error(fused, exact) <= 1.6 * error(stock, exact), (dtype, error(stock, exact), error(fused, exact))


def test_gelu_folded_into_fp8_quantization_is_torchs_gelu_then_quantization():
    """turbo's one kernel for the GELU, the rows' scales and e4m3 (fp8.gelu_quantized_rows)
    against torch's ops on the same values: a single block's MLP columns of its stacked product (a
    strided view), compiled with symbolic rows as the generator compiles, at two row counts; fp16
    rows whose columns are not contiguous; a NaN, which makes its row NaN as torch's ops do; and a
    whole folded layer against the GELU followed by the fp8 layer."""
    from qwen2vl_flux.generator_server.fp8 import Fp8Linear, Fp8LinearOfGelu, _quantize, _scale, gelu_quantized_rows

    def reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gelu = torch.nn.functional.gelu(rows, approximate="tanh")
        scale = _scale(gelu, "row")
        return _quantize(gelu, scale), scale

    def check(got: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> None:
        (quantized, scale), (expected, expected_scale) = got, reference(rows)
        assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == rows.shape
        assert scale.shape == expected_scale.shape == (rows.shape[0], 1)
        # the fp32 GELU may round to the neighbouring 16-bit value (another order of its terms)
        torch.testing.assert_close(scale, expected_scale, rtol=2 ** -7, atol=0)
        differing = (quantized.view(torch.uint8) != expected.view(torch.uint8)).float().mean().item()
        assert differing < 1e-3, differing

    torch.manual_seed(0)
    stacked = 2 * torch.randn(4608, 21504, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(gelu_quantized_rows, fullgraph=True, dynamic=True)
    transposed = (2 * torch.randn(300, 7, device="cuda", dtype=torch.float16)).t()
    with torch.inference_mode():
        for rows in (stacked[:, 9216:], stacked[:3000, 9216:]):
            got = gelu_quantized_rows(rows)
            check(got, rows)
            again = compiled(rows)
            assert torch.equal(again[0].view(torch.uint8), got[0].view(torch.uint8)) and torch.equal(again[1], got[1])
        assert transposed.stride(-1) != 1
        check(gelu_quantized_rows(transposed), transposed)

        poisoned = stacked[:4, :100].clone()
        poisoned[1, 5] = float("nan")
        quantized, scale = gelu_quantized_rows(poisoned)
        assert torch.isnan(scale[1]).all() and torch.isnan(quantized[1].float()).all()
        check((quantized[2:], scale[2:]), poisoned[2:])   # the rows without it are as before

        linear = torch.nn.Linear(3072, 1024, device="cuda", dtype=torch.bfloat16)
        x = 2 * torch.randn(2, 333, 3072, device="cuda", dtype=torch.bfloat16)
        layer = Fp8Linear(linear)
        folded = Fp8LinearOfGelu(layer)(x)
        unfolded = layer(torch.nn.functional.gelu(x, approximate="tanh"))
    assert folded.shape == unfolded.shape == (2, 333, 1024) and folded.dtype == torch.bfloat16
    assert ((folded.float() - unfolded.float()).norm() / unfolded.float().norm()).item() < 1e-2


def test_strided_attention_on_cudnn_is_diffusers_attention_to_rounding():
    """cuDNN's attention on the strided layouts (blocks.StridedAttnProcessor) against diffusers'
    _native_cudnn processor, which hands it contiguous copies: one double and one single block
    at full width, 4096 + 512 tokens, bf16, the same weights."""
    import copy

    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    plain = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).to("cuda", torch.bfloat16)
    plain.set_attention_backend("_native_cudnn")
    strided = copy.deepcopy(plain)
    strided_attention(strided)
    inputs = dict(hidden_states=torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
                  pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
                  timestep=torch.full([1], 0.5, device="cuda", dtype=torch.bfloat16),
                  guidance=torch.full([1], 3.5, device="cuda"),
                  txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16),
                  img_ids=FluxPipeline._prepare_latent_image_ids(1, 64, 64, "cuda", torch.bfloat16), return_dict=False)
    with torch.inference_mode():
        expected, got = plain(**inputs)[0].float(), strided(**inputs)[0].float()
    assert type(strided.single_transformer_blocks[0].attn.processor).__name__ == "StridedAttnProcessor"
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
