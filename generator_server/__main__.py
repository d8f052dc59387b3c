"""`qwen2vl-flux-generator`: the generator service process."""
from __future__ import annotations

import argparse
import sys

from qwen2vl_flux.serving.server import run
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc


def _extra_args(parser):
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the repeated blocks (default: on with CUDA)")
    parser.add_argument("--attention", default="auto",
                        help="diffusers attention backend; auto = _native_cudnn on CUDA, native on CPU")
    parser.add_argument("--turbo", action="store_true", help="fp8 transformer weights and activations (torchao)")
    parser.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD",
                        help="first-block cache (skips steps that change little; images change slightly)")
    parser.add_argument("--warm-up", default=None, metavar="MODES",
                        help="modes run once at 1024x1024 before SERVING (default with --compile: "
                             "variation,img2img,inpaint; 'none' for none)")


def _add_servicer(server, host, args):
    from .servicer import GeneratorServicer

    pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(host, args), server)


def _make_model(args, **kwargs):
    from qwen2vl_flux.client.modes import Mode

    from .pipeline import FluxGenerator

    generator = FluxGenerator(args.checkpoints, random_weights=args.random_weights, **kwargs)
    cuda = generator.device.type == "cuda"
    compile_ = cuda if args.compile is None else args.compile
    attention = ("_native_cudnn" if cuda else None) if args.attention == "auto" else args.attention
    generator.optimize(compile=compile_, attention=attention, turbo=args.turbo, step_cache=args.step_cache)
    warm = args.warm_up if args.warm_up is not None else ("variation,img2img,inpaint" if compile_ else "none")
    if warm != "none":
        generator.warm_up([Mode.parse(m) for m in warm.split(",")])
    return generator


def main(argv: list[str] | None = None) -> int:
    service = pb.DESCRIPTOR.services_by_name["Generator"].full_name
    return run("generator", 50052, service, argv, _add_servicer, _make_model, _extra_args)


if __name__ == "__main__":
    sys.exit(main())
