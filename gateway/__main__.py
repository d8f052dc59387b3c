"""`qwen2vl-flux-gateway`: the OpenAI-compatible HTTP gateway process (uvicorn)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from qwen2vl_flux.client import TLSFiles
from qwen2vl_flux.client.images import DEFAULT_MAX_PIXELS
from qwen2vl_flux.serving.server import log, log_event, setup_logging

from .app import MODEL_NAME, Settings, create_app


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="qwen2vl-flux-gateway",
                                description="OpenAI-compatible HTTP gateway (Images API: variations, edits)")
    p.add_argument("--encoder", default=env("QWEN2VL_FLUX_ENCODER", "127.0.0.1:50051"),
                   help="host:port, several comma-separated, or dns:///name:port (env QWEN2VL_FLUX_ENCODER)")
    p.add_argument("--generator", default=env("QWEN2VL_FLUX_GENERATOR", "127.0.0.1:50052"),
                   help="likewise (env QWEN2VL_FLUX_GENERATOR)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback unless asked)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--api-key-file", default=env("QWEN2VL_FLUX_API_KEY_FILE"),
                   help="API keys callers must send as 'Authorization: Bearer KEY', one per line "
                        "(env QWEN2VL_FLUX_API_KEY_FILE); an empty file or none: no authentication")
    p.add_argument("--backend-token-file", default=env("QWEN2VL_FLUX_TOKEN_FILE"),
                   help="the servers' bearer token (env QWEN2VL_FLUX_TOKEN_FILE, or the token in QWEN2VL_FLUX_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the servers' certificates")
    p.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS to the servers)")
    p.add_argument("--tls-key", default=None, help="client key (mutual TLS to the servers)")
    p.add_argument("--https-cert", default=None, help="PEM certificate chain: serve HTTPS (else plain HTTP, "
                                                      "for a TLS-terminating proxy in front)")
    p.add_argument("--https-key", default=None, help="PEM private key of --https-cert")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser requests from this origin (repeat; '*' for any)")
    p.add_argument("--model-name", default=MODEL_NAME, help="the model id /v1/models lists and `model` accepts")
    p.add_argument("--model-alias", action="append", default=[],
                   help="another `model` value to accept (repeat), for front-ends that send a fixed name")
    p.add_argument("--max-upload-bytes", type=int, default=50 * 1024 * 1024,
                   help="request bodies larger than this are refused (413) while they arrive")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images larger than this are refused before decoding")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each gRPC call, in seconds")
    p.add_argument("--retry-after", type=float, default=2.0,
                   help="seconds a 429 (queue full) or 503 answer asks the caller to wait")
    p.add_argument("--retry-generation", action="store_true",
                   help="re-run a generation on another replica if it failed UNAVAILABLE before any image")
    p.add_argument("--log-level", default="INFO")
    return p


def _lines(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    return tuple(line.strip() for line in Path(path).read_text().splitlines()
                 if line.strip() and not line.startswith("#"))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    setup_logging("gateway", args.log_level)
    if bool(args.https_cert) != bool(args.https_key):
        raise SystemExit("HTTPS needs both --https-cert and --https-key")
    token = _lines(args.backend_token_file)[:1] or ((os.environ.get("QWEN2VL_FLUX_TOKEN", "").strip(),)
                                                    if os.environ.get("QWEN2VL_FLUX_TOKEN") else ())
    tls = TLSFiles(args.tls_ca, args.tls_cert, args.tls_key) if (args.tls_ca or args.tls_cert or args.tls_key) else None
    settings = Settings(encoder=args.encoder, generator=args.generator, api_keys=_lines(args.api_key_file),
                        backend_token=token[0] if token else None, tls=tls, cors_origins=tuple(args.cors_origin),
                        model_name=args.model_name, model_aliases=tuple(args.model_alias),
                        max_upload_bytes=args.max_upload_bytes, max_image_pixels=args.max_image_pixels,
                        timeout=args.timeout, retry_after=args.retry_after, retry_generation=args.retry_generation)
    if not settings.api_keys and not _loopback(args.host):
        log.warning("listening beyond loopback without --api-key-file: anyone who reaches %s can generate",
                    args.host)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}: {e}") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_config=None, access_log=False, lifespan="on",
                            ssl_certfile=args.https_cert, ssl_keyfile=args.https_key, timeout_graceful_shutdown=30)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    log_event("listening", address=f"{args.host}:{port}", pid=os.getpid(), https=bool(args.https_cert),
              api_keys=len(settings.api_keys), encoder=args.encoder, generator=args.generator)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
