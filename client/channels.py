"""gRPC channels to one half (encoder or generator): several replicas spread with
gRPC's own round_robin, TLS / mutual TLS, fast reconnects, and a retry policy
for the idempotent encoder calls only (a generation is never silently replayed)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from .wire import MAX_MESSAGE_BYTES

ENCODER_SERVICE = "qwen2vl_flux.v1.Encoder"
GENERATOR_SERVICE = "qwen2vl_flux.v1.Generator"

# Encoder calls are pure functions of their input: retrying them is safe. Only
# UNAVAILABLE (nothing was processed) is retried, a few times, quickly, so a dead
# encoder is reported in well under a second instead of at the deadline.
ENCODER_RETRY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

_IP_PORT = re.compile(r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):\d+$")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: `ca` verifies the servers; `cert` + `key` are the client's own (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("mutual TLS needs both the client certificate and its key")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def target(addresses: "str | list[str]") -> str:
    """One address, several ("a:1,b:2" or a list: IP literals, spread round-robin), or
    any gRPC target such as dns:///generator.ns.svc:50052 (every A record a replica)."""
    if isinstance(addresses, str):
        if "://" in addresses or addresses.startswith(("ipv4:", "ipv6:", "unix:")):
            return addresses
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no address given")
    if len(addresses) == 1:
        return addresses[0]
    not_ip = [a for a in addresses if not _IP_PORT.match(a)]
    if not_ip:
        raise ValueError(f"several addresses must be IP:port ({not_ip[0]!r} is not); for host names use "
                         "a dns:/// target")
    scheme = "ipv6:" if addresses[0].startswith("[") else "ipv4:"
    return scheme + ",".join(addresses)


def open_channel(addresses: "str | list[str]", service: str, tls: TLSFiles | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, aio: bool = False) -> grpc.Channel:
    """A channel with the options above; `aio=True` gives a grpc.aio channel (AsyncClient)."""
    method_config = {"name": [{"service": service}]}
    if service == ENCODER_SERVICE:
        method_config["retryPolicy"] = ENCODER_RETRY
    config = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method_config]}
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        # A restarted server is found again within about a second, not after
        # gRPC's default backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    destination = target(addresses)
    kind = grpc.aio if aio else grpc
    if tls is None:
        return kind.insecure_channel(destination, options)
    return kind.secure_channel(destination, tls.credentials(), options)
