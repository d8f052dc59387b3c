"""`qwen2vl-flux-encoder`: the encoder service process."""
from __future__ import annotations

import sys

from qwen2vl_flux.serving.server import run
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc


def _extra_args(parser):
    parser.add_argument("--cache-size", type=int, default=64,
                        help="encodings kept (LRU by image bytes, focus, prompt, pixel budget); 0 = off")


def _add_servicer(server, host, args):
    from .servicer import EncoderServicer

    pb_grpc.add_EncoderServicer_to_server(EncoderServicer(host, args), server)


def _make_model(args, **kwargs):
    from qwen2vl_flux.serving.server import log_event

    from .model import Qwen2VLFluxEncoder

    encoder = Qwen2VLFluxEncoder(args.checkpoints, random_weights=args.random_weights, **kwargs)
    control = encoder.control
    log_event("control maps", line_auto=control.resolve_detector("auto"), line_detectors=control.line_detectors(),
              depth="depth-anything-v2" if control.depth_available() else "none (depth maps must be sent)",
              note="" if control.layout.anyline.exists() else f"no {control.layout.anyline}: auto uses canny")
    return encoder


def main(argv: list[str] | None = None) -> int:
    service = pb.DESCRIPTOR.services_by_name["Encoder"].full_name
    return run("encoder", 50051, service, argv, _add_servicer, _make_model, _extra_args)


if __name__ == "__main__":
    sys.exit(main())
