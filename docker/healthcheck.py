#!/usr/bin/env python3
"""Container health check: ask the server's grpc.health.v1 service whether it serves.

    qwen2vl-flux-healthcheck [ADDRESS] [--service NAME] [--timeout SECONDS]

ADDRESS defaults to $QWEN2VL_FLUX_HEALTH_ADDRESS (set per image: 127.0.0.1:50051 for the
encoder, 127.0.0.1:50052 for the generator). Exit 0 when the answer is SERVING, 1 otherwise
(NOT_SERVING while the weights load or while draining, no answer, refused connection).
Health stays open when the server requires a token; under TLS, start the server with
--health-port and point this check at that plaintext port.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl-flux-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=os.environ.get("QWEN2VL_FLUX_HEALTH_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.address}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
