"""Errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), with HTTP
statuses from the gRPC ones and the retry headers the openai SDK obeys.

The SDK retries 408/409/429/5xx by default unless `x-should-retry: false` says no. A
generation is not free and not always safe to replay, so only refusals that happened
before any work (admission: queue full; an encoder call, a pure function) say
`x-should-retry: true`; every other failure of a generation says false.
"""
from __future__ import annotations

import grpc

from qwen2vl_flux.client import InvalidArgument, ServiceError

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Names of our parameters as the OpenAI fields that carry them.
OPENAI_FIELD = {"image_count": "n", "width": "size", "height": "size", "init_image": "image",
                "mask_from_alpha": "mask", "center_x": "focus", "center_y": "focus", "radius": "focus",
                "format": "output_format"}


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class APIError(Exception):
    """An HTTP error answer: status, OpenAI error body, headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry: bool | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry, self.retry_after = retry, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after is not None:
            headers["retry-after"] = f"{self.retry_after:g}"
        return headers


def invalid(error: InvalidArgument) -> APIError:
    """A caller's mistake found here or by the client library's rules (modes.py)."""
    field = OPENAI_FIELD.get(error.parameter, error.parameter)
    message = str(error) if field == error.parameter else f"{field} ({error.parameter}): {error}"
    return APIError(400, message, param=field, code="invalid_argument")


def from_service(error: ServiceError, stage: str, progressed: bool, retry_after: float) -> APIError:
    """A failed gRPC call. `stage`: "encode" (encoder calls: pure functions, safe to
    replay) or "generate"; `progressed`: the generator had reported a step."""
    code = error.code
    status = HTTP_STATUS.get(code, 500)
    message = str(error)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # The caller's key was accepted here; the gateway's own backend token was refused.
        return APIError(502, f"{message} (the gateway's --backend-token-file does not match the servers' token)",
                        code="backend_unauthenticated", retry=False)
    if stage == "encode":
        retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED)
    else:
        # Refused at admission (queue full) ran nothing; anything else may have.
        retry = code == grpc.StatusCode.RESOURCE_EXHAUSTED and not progressed
    return APIError(status, message, code=code.name.lower(), retry=retry if status >= 408 else None,
                    retry_after=retry_after if retry and status in (429, 503) else None)
