"""`qwen2vl-flux-generator`: the generator service process."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qwen2vl_flux.serving.server import log_event, run
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc


def _step_cache(text: str):
    from .pipeline import StepCache

    try:
        return StepCache.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _graph_limit(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of graphs (0: off), got {text!r}")
    return int(text)


def _extra_args(parser):
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the repeated transformer blocks (default: on with CUDA)")
    parser.add_argument("--attention", default="auto",
                        help="diffusers attention backend; auto = _native_cudnn on CUDA, native on CPU")
    parser.add_argument("--turbo", action="store_true",
                        help="fp8 transformer Linear layers, weights and activations (row-wise scales)")
    parser.add_argument("--step-cache", type=_step_cache, default=None, metavar="THRESHOLD|fixed:K",
                        help="reuse the last velocity on some steps (images change): a first-block cache "
                             "threshold such as 0.08, or fixed:K (first 4 and last 2 steps run, then one in K)")
    parser.add_argument("--cuda-graphs", type=_graph_limit, default=0, metavar="N",
                        help="replay each step as a CUDA graph, one per input shape and ControlNet setting, "
                             "captured the second request that meets it, at most N kept; their memory pool keeps "
                             "up to one step's working memory more (needs CUDA; not with --step-cache THRESHOLD; "
                             "default 0: off)")
    parser.add_argument("--warm-up", default=None, metavar="MODES",
                        help="modes run once at 1024x1024 before SERVING (default with --compile: "
                             "variation,img2img,inpaint; 'none' for none)")
    parser.add_argument("--compile-cache", default=os.environ.get("QWEN2VL_FLUX_COMPILE_CACHE"), metavar="DIR",
                        help="keep compiled kernels here across restarts (a volume; env QWEN2VL_FLUX_COMPILE_CACHE; "
                             "default: none)")


def _add_servicer(server, host, args):
    from .servicer import GeneratorServicer

    pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(host, args), server)


def _make_model(args, **kwargs):
    """Imports, weights, speed options, compile cache, warm-up: each phase is a log line with its duration."""
    start = time.perf_counter()
    from qwen2vl_flux.client.modes import Mode

    from .compile_cache import CompileCache, cache_fields
    from .pipeline import FluxGenerator, SpeedOptions, import_diffusers

    cuda = str(kwargs["device"]).startswith("cuda")
    compile_ = cuda if args.compile is None else args.compile
    attention = ("_native_cudnn" if cuda else None) if args.attention == "auto" else args.attention
    options = SpeedOptions(compile=compile_, attention=attention, turbo=args.turbo, step_cache=args.step_cache,
                           cuda_graphs=args.cuda_graphs)
    options.check(kwargs["device"])   # before the weights: a wrong combination fails at once
    import_diffusers()
    imports = time.perf_counter() - start
    log_event("libraries imported", seconds=round(imports, 2))
    start = time.perf_counter()
    generator = FluxGenerator(args.checkpoints, random_weights=args.random_weights, **kwargs)
    generator.startup["imports"] = imports
    generator.startup["weights"] = time.perf_counter() - start
    log_event("weights loaded", seconds=round(generator.startup["weights"], 2), device=str(generator.device),
              random_weights=bool(args.random_weights))
    start = time.perf_counter()
    generator.optimize(options)
    generator.startup["speed_options"] = time.perf_counter() - start
    log_event("speed options applied", seconds=round(generator.startup["speed_options"], 2), compile=compile_,
              attention=attention or "native", turbo=args.turbo, step_cache=str(args.step_cache or "off"),
              cuda_graphs=args.cuda_graphs)
    if compile_ and args.compile_cache:
        generator.compile_cache = CompileCache(Path(args.compile_cache), cache_fields(generator, options))
        generator.compile_cache.load()
        if generator.precompiled is not None:
            generator.precompiled.use_directory(generator.compile_cache.blocks_dir, generator.compile_cache.blocks)
    warm = args.warm_up if args.warm_up is not None else ("variation,img2img,inpaint" if compile_ else "none")
    if warm != "none":
        start = time.perf_counter()
        generator.warm_up([Mode.parse(m) for m in warm.split(",")],
                          on_phase=lambda name, seconds, graphs: log_event(name, seconds=round(seconds, 2),
                                                                           graphs_compiled=graphs))
        generator.startup["warm_up"] = time.perf_counter() - start
        log_event("warm-up done", seconds=round(generator.startup["warm_up"], 2), modes=warm,
                  compile_seconds=_compile_seconds() if compile_ else {},
                  graph_caches=_graph_cache_use() if compile_ else {},
                  precompiled_blocks=generator.precompiled.obtained if generator.precompiled else {})
        if generator.compile_cache is not None:
            generator.compile_cache.save(generator.precompiled.digests if generator.precompiled else {})
    if generator.compile_cache is not None and generator.precompiled is not None:
        # A block first compiled after start-up (the ControlNet's, on first use) joins the entry.
        cache, blocks = generator.compile_cache, generator.precompiled
        blocks.on_saved = lambda: cache.save(blocks.digests)
    return generator


def _compile_seconds(top: int = 8) -> dict:
    """torch.compile's own timers (Dynamo tracing, cache loads, Inductor), the largest first:
    where a slow start-up went."""
    from torch._dynamo.utils import compilation_time_metrics

    totals = sorted(((sum(v), k) for k, v in compilation_time_metrics.items()), reverse=True)[:top]
    return {name: round(seconds, 2) for seconds, name in totals}


def _graph_cache_use() -> dict:
    """Hits, misses and bypasses of AOTAutograd's and Inductor's graph caches: on a warm start
    every graph should hit both (a bypass re-runs tracing passes the cache exists to spare)."""
    from torch._dynamo.utils import counters

    wanted = {"aot_autograd": "autograd_cache_", "inductor": "fxgraph_cache_"}
    return {name: {k.removeprefix(prefix): v for k, v in counters[name].items() if k.startswith(prefix)}
            for name, prefix in wanted.items()}


def main(argv: list[str] | None = None) -> int:
    service = pb.DESCRIPTOR.services_by_name["Generator"].full_name
    return run("generator", 50052, service, argv, _add_servicer, _make_model, _extra_args)


if __name__ == "__main__":
    sys.exit(main())
