"""The generator's speed options on the CPU: the fixed step cache's schedule, fp8 Linear
layers, and a compile cache that is missing, foreign or corrupt (ignored, never fatal).
Their speed is measured in bench/, on the GPU."""
from __future__ import annotations

import json
import logging

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_flux.client.launch import ServerProcess
from qwen2vl_flux.client.modes import Mode, resolve_parameters
from qwen2vl_flux.generator_server.compile_cache import ARTIFACTS, MANIFEST, CompileCache, cache_fields
from qwen2vl_flux.generator_server import blocks, modulation
from qwen2vl_flux.generator_server.fp8 import Fp8Linear, Fp8LinearOfGelu, quantize_linears
from qwen2vl_flux.generator_server.pipeline import (Conditioning, FluxGenerator, GenerationJob, SpeedOptions,
                                                    StepCache)
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def generator(tiny_checkpoints):
    return FluxGenerator(tiny_checkpoints)


def _variation(generator: FluxGenerator, steps: int = 10) -> np.ndarray:
    cfg = generator.fingerprint
    torch.manual_seed(0)
    cond = Conditioning({"a": torch.randn(1, 40, cfg.joint_attention_dim)}, None, torch.randn(1, cfg.pooled_dim))
    params, _ = resolve_parameters(Mode.VARIATION, {"seed": 3, "steps": steps, "width": 64, "height": 48})
    return np.asarray(generator.generate(GenerationJob(Mode.VARIATION, params, cond))[0], dtype=np.int16)


def test_fixed_schedule_runs_the_first_four_and_last_two_steps_and_one_in_k_between():
    skipped = StepCache.parse("fixed:2").skipped(28)
    assert len(skipped) == 11 and not skipped & {0, 1, 2, 3, 4, 26, 27}
    assert 28 - len(StepCache.parse("fixed:3").skipped(28)) == 14
    assert StepCache.parse("0.08") == StepCache(threshold=0.08) and str(StepCache.parse("fixed:3")) == "fixed:3"
    for bad in ("fixed:1", "fixed:x", "0", "fast"):
        with pytest.raises(ValueError, match="fixed:K"):
            StepCache.parse(bad)


def test_fixed_step_cache_skips_transformer_calls_and_keeps_the_image_close(generator):
    calls = []
    hook = generator.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        lossless = _variation(generator)
        assert len(calls) == 10
        calls.clear()
        generator.speed = SpeedOptions(step_cache=StepCache(interval=2))
        cached = _variation(generator)
    finally:
        generator.speed = SpeedOptions()
        hook.remove()
    assert len(calls) == 10 - len(StepCache(interval=2).skipped(10)) == 8
    assert cached.shape == lossless.shape and (cached != lossless).any()
    assert np.abs(cached - lossless).mean() < 40   # the same picture, not another one


def _controlnet_image(generator: FluxGenerator) -> np.ndarray:
    cfg = generator.fingerprint
    torch.manual_seed(0)
    cond = Conditioning({"a": torch.randn(1, 40, cfg.joint_attention_dim)}, None, torch.randn(1, cfg.pooled_dim))
    params, _ = resolve_parameters(Mode.CONTROLNET, {"seed": 3, "steps": 3, "image_count": 2})
    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    job = GenerationJob(Mode.CONTROLNET, params, cond, init_image=picture,
                        control_maps={"depth": picture, "line": picture.rotate(90)})
    return np.stack([np.asarray(im) for im in generator.generate(job)])


def test_single_blocks_in_joint_layout_change_no_value(tiny_checkpoints):
    """The layout that lets every single block share one compiled graph is a copy, not a change:
    bitwise the same images eagerly, in a ControlNet mode (whose residuals make the layout differ)."""
    plain, joint = FluxGenerator(tiny_checkpoints), FluxGenerator(tiny_checkpoints)
    blocks.share_single_block_graphs(joint.transformer)
    blocks.share_single_block_graphs(joint.controlnet)
    assert {type(b).__name__ for b in joint.transformer.single_transformer_blocks} == {"_SingleBlockInJointLayout"}
    assert np.array_equal(_controlnet_image(plain), _controlnet_image(joint))


def _velocities(generator: FluxGenerator) -> list[torch.Tensor]:
    outputs = []
    hook = generator.transformer.register_forward_hook(lambda m, i, out: outputs.append(out[0]))
    try:
        _controlnet_image(generator)
    finally:
        hook.remove()
    return outputs


def test_fused_products_compute_what_the_stock_blocks_compute(tiny_checkpoints, monkeypatch):
    """The concatenation-free proj_out (the compiled path's blocks; the GELU epilogue is the GPU's,
    tests/test_gpu.py) gives diffusers' velocities to rounding, the ControlNet's blocks included.
    turbo's fp8 layers take the concatenation-free proj_out, each part with its own scales (as
    close to the full-precision velocities as turbo's concatenated product is), a single
    block's four input products as one, and the MLPs' GELUs inside their down-projections'
    quantization (both the same values, bitwise, on the CPU)."""
    plain, fused = FluxGenerator(tiny_checkpoints), FluxGenerator(tiny_checkpoints)
    for model in (fused.transformer, fused.controlnet):
        blocks.fuse_products(model)
    single, double = fused.transformer.single_transformer_blocks[0], fused.transformer.transformer_blocks[0]
    assert isinstance(single.proj_out, blocks.ConcatFreeLinear) and isinstance(single.proj_mlp, blocks.LinearGeluTanh)
    assert isinstance(double.ff.net[0], blocks.LinearGeluTanh) and isinstance(double.ff_context.net[0], blocks.LinearGeluTanh)
    assert isinstance(fused.controlnet.single_transformer_blocks[0].proj_out, blocks.ConcatFreeLinear)
    expected, got = _velocities(plain), _velocities(fused)
    assert len(got) == 3
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)

    turbo, split, unfolded, stacked = (FluxGenerator(tiny_checkpoints) for _ in range(4))
    for generator in (turbo, split, unfolded, stacked):
        quantize_linears(generator.transformer)
        blocks.share_single_block_graphs(generator.transformer)
        blocks.strided_attention(generator.transformer)
    blocks.fuse_products(stacked.transformer)
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "stack_inputs", lambda block: None)
        blocks.fuse_products(split.transformer)
        patch.undo()
        patch.setattr(blocks, "fold_gelu", lambda block: None)
        blocks.fuse_products(unfolded.transformer)
    single = stacked.transformer.single_transformer_blocks[0]
    assert isinstance(single.proj_out, blocks.ConcatFreeFp8Linear)
    assert single.proj_out.first.weight.is_contiguous() and single.proj_out.second.linear.bias is None
    assert isinstance(single.proj_out.second, Fp8LinearOfGelu) and isinstance(single.act_mlp, torch.nn.Identity)
    assert single.proj_in.out_features == 3 * single.attn.inner_dim + single.mlp_hidden_dim
    assert single.attn.to_k.weight.data_ptr() == single.proj_in.weight[single.attn.inner_dim:].data_ptr()
    double = stacked.transformer.transformer_blocks[0]
    assert double.attn.fused_projections and isinstance(double.attn.to_added_qkv, Fp8Linear)
    assert type(double.ff.net[0]) is Fp8Linear and isinstance(double.ff_context.net[2], Fp8LinearOfGelu)
    assert not any(isinstance(m, blocks.LinearGeluTanh) for m in stacked.transformer.modules())
    assert not any(isinstance(m, Fp8LinearOfGelu) for m in unfolded.transformer.modules())
    for e, t, s, u, f in zip(expected, _velocities(turbo), _velocities(split), _velocities(unfolded),
                             _velocities(stacked)):
        assert not torch.equal(t, s) and torch.equal(s, f) and torch.equal(u, f)
        assert (s - e).norm() < 1.25 * (t - e).norm() and (s - e).norm() < 0.1 * e.norm()


@pytest.mark.parametrize("backend", [None, "_native_math"])
def test_strided_attention_computes_what_diffusers_attention_computes(tiny_checkpoints, backend, monkeypatch):
    """Attention on the layouts Inductor gives it gives diffusers' velocities, double and single
    blocks, transformer and ControlNet, with torch's own SDPA choice and with a backend named, V
    reaching SDPA as a view, not a copy. A mask goes to diffusers' processor, and a backend that
    is not torch's SDPA keeps it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    plain, strided = FluxGenerator(tiny_checkpoints), FluxGenerator(tiny_checkpoints)
    for generator in (plain, strided):
        for model in (generator.transformer, generator.controlnet):
            if backend:
                model.set_attention_backend(backend)
    for model in (strided.transformer, strided.controlnet):
        blocks.strided_attention(model)
        processors = {type(b.attn.processor) for b in blocks.repeated_blocks(model)}
        assert processors == {blocks.StridedAttnProcessor}, processors
    expected = _velocities(plain)
    sdpa, v_layouts = torch.nn.functional.scaled_dot_product_attention, []

    def spy(query, key, value, *args, **kwargs):   # V is (B, H, S, D), stored (B, S, H, D)
        v_layouts.append(value.stride(2) == value.shape[1] * value.shape[3])
        return sdpa(query, key, value, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = _velocities(strided)
    assert len(got) == 3 and v_layouts and all(v_layouts)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)

    diffusers_calls, diffusers_call = [], FluxAttnProcessor.__call__
    monkeypatch.setattr(FluxAttnProcessor, "__call__",
                        lambda self, *a, **kw: diffusers_calls.append(1) or diffusers_call(self, *a, **kw))
    attn = strided.transformer.single_transformer_blocks[0].attn
    x = torch.randn(1, 10, attn.query_dim)
    unmasked = attn(x)
    torch.testing.assert_close(attn(x, attention_mask=torch.ones(1, 1, 10, 10, dtype=torch.bool)), unmasked)
    assert diffusers_calls == [1]

    other = FluxGenerator(tiny_checkpoints)
    for block in blocks.repeated_blocks(other.transformer):
        block.attn.processor._attention_backend = "flex"   # not torch's SDPA: left as it is
    blocks.strided_attention(other.transformer)
    assert not any(isinstance(b.attn.processor, blocks.StridedAttnProcessor)
                   for b in blocks.repeated_blocks(other.transformer))


def test_modulation_computed_ahead_gives_the_images_of_one_product_a_step(tiny_checkpoints, monkeypatch):
    """The AdaLN products of many steps at once (the compiled path's) paint what one product a
    step paints: in a ControlNet mode with two images, and chunks of two steps, so the
    ControlNet's rows and a second chunk are used. Rows not set fail loudly."""
    plain, ahead = FluxGenerator(tiny_checkpoints), FluxGenerator(tiny_checkpoints)
    config = ahead.transformer.config
    assert modulation.install(ahead.transformer) == config.num_layers + config.num_single_layers
    assert modulation.install(ahead.transformer) == len(modulation.modulated(ahead.transformer))   # idempotent
    assert modulation.install(ahead.controlnet) > 0
    monkeypatch.setattr(modulation.ModulationSchedule, "CHUNK_ROWS", 4)
    computed = []
    monkeypatch.setattr(modulation.ModulationSchedule, "_compute",
                        lambda self, first, original=modulation.ModulationSchedule._compute:
                        (computed.append(first), original(self, first)))
    expected, got = _velocities(plain), _velocities(ahead)
    assert computed == [0, 2] and len(got) == 3
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)

    # For CUDA graphs every block reads its rows from one buffer of its own, overwritten at each
    # step (a graph replays the addresses it captured): the same velocities, bitwise.
    block = ahead.transformer.single_transformer_blocks[0]
    addresses = []
    hook = block.register_forward_pre_hook(lambda m, a: addresses.append(m.modulation_rows.data_ptr()))
    views = _velocities(ahead)
    init = modulation.ModulationSchedule.__init__
    monkeypatch.setattr(modulation.ModulationSchedule, "__init__",
                        lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "fixed_addresses": True}))
    fixed = _velocities(ahead)
    hook.remove()
    assert len(set(addresses[:3])) == 3 and len(set(addresses[3:])) == 1, addresses
    for v, f in zip(views, fixed, strict=True):
        assert torch.equal(v, f)

    # A request hands its rows back: a call outside a schedule fails instead of using stale rows.
    assert all(block.modulation_rows is None for block in modulation.modulated(ahead.controlnet))
    with pytest.raises(RuntimeError, match="ModulationSchedule"):
        with torch.inference_mode():
            ahead.transformer(hidden_states=torch.randn(1, 4, config.in_channels), timestep=torch.ones(1),
                              guidance=torch.ones(1), pooled_projections=torch.randn(1, ahead.fingerprint.pooled_dim),
                              encoder_hidden_states=torch.randn(1, 3, ahead.fingerprint.inner_dim),
                              txt_ids=torch.zeros(3, 3), img_ids=torch.zeros(4, 3))


def test_compiled_warm_up_traces_four_graphs_that_serve_every_mode_and_size(tiny_checkpoints):
    """Two block classes x (batch 1, batch 2+): a ControlNet mode and another size add none. More
    graphs mean seconds more of every start, cache hit or not (a layout or a tensor kind that
    dynamo guards on, as the first single block's inputs and the lazily loaded ControlNet's
    inference-mode weights were)."""
    generator = FluxGenerator(tiny_checkpoints)
    # flash picks its SDPA backend inside the graph, as cuDNN attention does on the GPU
    generator.optimize(SpeedOptions(compile=True, attention="_native_flash"))
    runs = {}
    generator.warm_up([Mode.VARIATION, Mode.CONTROLNET], size=128,
                      on_phase=lambda name, seconds, graphs: runs.setdefault(name, graphs))
    assert runs == {"warm-up variation 128x128 x1": 2, "warm-up controlnet 128x128 x1": 0,
                    "warm-up variation 128x128 x2": 2, "warm-up variation 96x160 x1": 0}, runs

    # Requests unlike the warm-up (sizes, text lengths, batch 3, every float parameter) reuse them.
    from torch._dynamo.utils import counters

    cfg, graphs = generator.fingerprint, counters["stats"]["unique_graphs"]
    picture = Image.new("RGB", (144, 112), (10, 200, 30))
    for mode, given in [(Mode.VARIATION, {"guidance": 7.5, "steps": 2, "width": 160, "height": 96}),
                        (Mode.IMG2IMG, {"guidance": 1.25, "strength": 0.55, "steps": 4}),
                        (Mode.CONTROLNET, {"depth_strength": 0.7, "line_strength": 0.13, "image_count": 3, "steps": 2}),
                        (Mode.CONTROLNET_INPAINT, {"depth_strength": 0.33, "line_strength": 0.9, "steps": 2}),
                        (Mode.INPAINT, {"strength": 0.9, "steps": 3, "image_count": 2})]:
        prompt = torch.randn(1, 512, cfg.inner_dim) if mode is Mode.IMG2IMG else None
        cond = Conditioning({"a": torch.randn(1, 77, cfg.joint_attention_dim),
                             "b": torch.randn(1, 60, cfg.joint_attention_dim)}, prompt, torch.randn(1, cfg.pooled_dim))
        params, _ = resolve_parameters(mode, dict(given, seed=1))
        generator.generate(GenerationJob(mode, params, cond, init_image=picture, mask=picture.convert("L"),
                                         control_maps={"depth": picture, "line": picture}))
        assert counters["stats"]["unique_graphs"] == graphs, mode


def test_a_restart_loads_the_precompiled_blocks_and_traces_nothing(tiny_checkpoints, tmp_path):
    """Blocks compiled ahead of time and saved are loaded by the next start: no graph traced,
    the same images; a corrupt file is compiled again. With turbo, whose fp8 buffers make torch
    pickle the block with its guards, and the ControlNet's bf16 blocks of the same classes
    (their own graphs: one graph for both failed on its first call)."""
    from torch._dynamo.utils import counters

    def started(trusted: dict[str, str]) -> FluxGenerator:
        generator = FluxGenerator(tiny_checkpoints)
        generator.optimize(SpeedOptions(compile=True, attention="_native_flash", turbo=True))
        generator.precompiled.use_directory(tmp_path / "blocks", trusted)
        generator.warm_up([Mode.VARIATION, Mode.CONTROLNET], size=128)
        return generator

    torch._dynamo.reset()
    first = started({})
    # fp8 and bf16 double and single blocks at batch 1, fp8 ones at batch 2 (the warm-up's batch-2 run)
    assert set(first.precompiled.obtained.values()) == {"compiled"} and len(first.precompiled.digests) == 6, \
        first.precompiled.obtained

    traced = counters["stats"]["unique_graphs"]
    loaded = started(first.precompiled.digests)
    assert set(loaded.precompiled.obtained.values()) == {"loaded"}, loaded.precompiled.obtained
    assert counters["stats"]["unique_graphs"] == traced
    assert np.array_equal(_variation(loaded), _variation(first))

    # A corrupt file is ignored (compiled again), never fatal.
    name = next(iter(first.precompiled.digests))
    (tmp_path / "blocks" / name).write_bytes(b"\x00garbage")
    damaged = started(first.precompiled.digests)
    assert damaged.precompiled.obtained[name.removesuffix(".bin")] == "compiled"
    assert np.array_equal(_variation(damaged), _variation(first))


def test_first_block_cache_compiles_with_its_graph_break(tiny_checkpoints):
    """The first-block cache decides outside the graph whether the remaining blocks run, so under
    it the blocks compile with graph breaks (with whole graphs the warm-up raised Unsupported),
    with torch.compile. A restart (Dynamo reset, the on-disk caches kept) traces them again but
    takes each graph from AOTAutograd's cache: the SDPA backend pick in the graph made it bypass
    the cache, so every start re-ran its metadata pass on each graph."""
    from torch._dynamo.utils import counters

    generator = FluxGenerator(tiny_checkpoints)
    generator.optimize(SpeedOptions(compile=True, attention="_native_flash", step_cache=StepCache(threshold=0.05)))
    assert generator.precompiled is None
    generator.warm_up([Mode.VARIATION], size=128)
    assert _variation(generator, steps=3).shape == (48, 64, 3)

    torch._dynamo.reset()
    before = dict(counters["aot_autograd"])
    generator.warm_up([Mode.VARIATION], size=128)
    delta = {k: v - before.get(k, 0) for k, v in counters["aot_autograd"].items() if v != before.get(k, 0)}
    assert delta.get("autograd_cache_hit") and not delta.get("autograd_cache_bypass") \
        and not delta.get("autograd_cache_miss"), delta


def test_fp8_linear_matches_the_full_precision_layer_within_fp8_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(2, 33, 256)
    for granularity in ("row", "tensor"):
        out, ref = Fp8Linear(linear, granularity)(x), linear(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert ((out - ref).norm() / ref.norm()).item() < 0.06


def test_stacked_and_split_fp8_layers_compute_what_their_layers_compute():
    """`Fp8Linear.stacked` (one input, one product) gives each layer's output, bitwise on the CPU,
    a bias-less layer among them, and leaves the layers as views of its weight; `split_columns`
    parts sum to the layer's output within fp8 error, the bias counted once."""
    torch.manual_seed(0)
    layers = [Fp8Linear(torch.nn.Linear(64, n, bias=n != 32)) for n in (32, 48, 16)]
    x = torch.randn(2, 5, 64)
    expected = [layer(x) for layer in layers]
    stacked = Fp8Linear.stacked(layers)
    for e, got, layer in zip(expected, stacked(x).split([32, 48, 16], dim=-1), layers):
        assert torch.equal(got, e) and torch.equal(layer(x), e)
    assert layers[1].weight.data_ptr() == stacked.weight[32:].data_ptr() and layers[0].bias is None
    with pytest.raises(ValueError, match="row-scaled"):
        Fp8Linear.stacked([layers[0], Fp8Linear(torch.nn.Linear(64, 8), "tensor")])

    linear = torch.nn.Linear(96, 24)
    first, second = Fp8Linear(linear).split_columns(40)
    a, b = torch.randn(3, 40), torch.randn(3, 56)
    ref = linear(torch.cat([a, b], -1))
    assert second.bias is None and ((first(a) + second(b) - ref).norm() / ref.norm()).item() < 0.06


def test_turbo_quantizes_the_transformer_except_what_stays_precise(tiny_checkpoints):
    turbo = FluxGenerator(tiny_checkpoints)
    lossless = _variation(turbo)
    turbo.optimize(SpeedOptions(turbo=True))
    kinds = {name: type(module).__name__ for name, module in turbo.transformer.named_modules()
             if isinstance(module, (torch.nn.Linear, Fp8Linear))}
    assert kinds["x_embedder"] == kinds["proj_out"] == "Linear"
    assert all(kind == "Linear" for name, kind in kinds.items() if ".norm" in name or name.startswith("norm"))
    assert kinds["transformer_blocks.0.attn.to_q"] == kinds["single_transformer_blocks.0.proj_mlp"] == "Fp8Linear"
    assert quantize_linears(torch.nn.Sequential(torch.nn.Linear(16, 16))) == 1
    image = _variation(turbo)
    assert image.shape == lossless.shape and np.abs(image - lossless).mean() < 20


def _fields(generator) -> dict:
    return cache_fields(generator, SpeedOptions(compile=True))


def test_compile_cache_miss_foreign_and_corrupt_entries_are_ignored_with_a_log_line(generator, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qwen2vl_flux")
    cache = CompileCache(tmp_path, _fields(generator))
    assert cache.load() is False and cache.status == "miss"

    cache.entry.mkdir(parents=True)
    (cache.entry / ARTIFACTS).write_bytes(b"not torch artifacts")
    foreign = dict(_fields(generator), torch="0.0.1")
    (cache.entry / MANIFEST).write_text(json.dumps({"fields": foreign, "sha256": "0"}))
    assert cache.load() is False and cache.status == "ignored" and "another configuration" in cache.detail

    (cache.entry / MANIFEST).write_text("{truncated")
    assert cache.load() is False and cache.status == "ignored" and "JSONDecodeError" in cache.detail
    assert sum("compile cache ignored" in r.getMessage() for r in caplog.records) == 2


def test_generator_starts_and_serves_with_a_corrupt_compile_cache(tiny_checkpoints, generator, tmp_path):
    cache = CompileCache(tmp_path / "cache", _fields(generator))
    cache.entry.mkdir(parents=True)
    (cache.entry / ARTIFACTS).write_bytes(b"\x00garbage")
    (cache.entry / MANIFEST).write_text(json.dumps({"fields": cache.fields, "sha256": "feed"}))
    server = ServerProcess("generator", tiny_checkpoints, "--compile", "--warm-up", "none",
                           "--compile-cache", str(tmp_path / "cache"))
    try:
        server.start().wait_serving(timeout=180)
        with grpc.insecure_channel(server.address) as channel:
            startup = pb_grpc.GeneratorStub(channel).GetInfo(pb.GetInfoRequest(), timeout=60).startup
        assert startup.compile_cache == "ignored" and "checksum" in startup.compile_cache_detail
        assert startup.compiled and startup.phase_seconds["weights"] > 0 and startup.phase_seconds["imports"] > 0
    finally:
        server.stop()
    lines = server.log_records()
    ignored = [line for line in lines if line["msg"] == "compile cache ignored"]
    assert ignored and cache.key == ignored[0]["key"] and "checksum" in ignored[0]["reason"]
    assert any(line["msg"] == "weights loaded" and line["seconds"] > 0 for line in lines)


def test_generator_restart_loads_its_precompiled_blocks_from_the_compile_cache(tiny_checkpoints, tmp_path):
    """Two starts of a compiling generator with one --compile-cache: the second, in a fresh
    local torch cache (as a new container), loads the four block graphs and traces none."""
    def start(n: int):
        server = ServerProcess("generator", tiny_checkpoints, "--compile", "--attention", "_native_flash",
                               "--warm-up", "variation", "--compile-cache", str(tmp_path / "cache"),
                               log_path=tmp_path / f"generator-{n}.log",
                               env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{n}")})
        try:
            server.start().wait_serving(timeout=300)
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.GeneratorStub(channel)
                startup = stub.GetInfo(pb.GetInfoRequest(), timeout=60).startup
        finally:
            server.stop()
        lines = server.log_records()
        return startup, next(line for line in lines if line["msg"] == "warm-up done"), lines

    startup, done, _ = start(1)
    assert startup.compile_cache == "saved" and "4 compiled" in startup.compile_cache_detail
    assert set(done["precompiled_blocks"].values()) == {"compiled"}
    startup, done, lines = start(2)
    assert startup.compile_cache == "hit" and "precompiled blocks: 4 loaded" in startup.compile_cache_detail, startup
    assert set(done["precompiled_blocks"].values()) == {"loaded"}, done
    runs = {line["msg"]: line["graphs_compiled"] for line in lines if "graphs_compiled" in line}
    assert sum(runs.values()) == 4 and done["compile_seconds"].get("bytecode_tracing", 0) == 0, (runs, done)


@pytest.mark.parametrize("flags, message", [
    (("--cuda-graphs", "2", "--device", "cpu"), "CUDA graphs need a CUDA device"),
    (("--cuda-graphs", "two"), "expected a number of graphs"),
], ids=["cpu", "not-a-number"])
def test_generator_refuses_cuda_graphs_it_cannot_keep(tiny_checkpoints, flags, message):
    server = ServerProcess("generator", tiny_checkpoints, *flags)
    server.start()
    assert server.process.wait(timeout=120) == 2
    assert message in server.log_path.read_text()


def test_generator_refuses_a_malformed_step_cache_flag(tiny_checkpoints):
    server = ServerProcess("generator", tiny_checkpoints, "--step-cache", "fixed:1")
    server.start()
    assert server.process.wait(timeout=120) == 2
    assert "fixed:K with K >= 2" in server.log_path.read_text()
