"""`qwen2vl-flux-generator`: the generator service process."""
from __future__ import annotations

import sys

from qwen2vl_flux.serving.server import run
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc


def _add_servicer(server, host, args):
    from .servicer import GeneratorServicer

    pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(host, args), server)


def _make_model(args, **kwargs):
    from .pipeline import FluxGenerator

    return FluxGenerator(args.checkpoints, **kwargs)


def main(argv: list[str] | None = None) -> int:
    service = pb.DESCRIPTOR.services_by_name["Generator"].full_name
    return run("generator", 50052, service, argv, _add_servicer, _make_model)


if __name__ == "__main__":
    sys.exit(main())
