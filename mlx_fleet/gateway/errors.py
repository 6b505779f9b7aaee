"""OpenAI's error format, and the HTTP status of each fleet error code (pure: no I/O)."""

from __future__ import annotations

from typing import Any

from actors.protocol import (
    BAD_REQUEST, CANCELLED, DUPLICATE_REQUEST, ERROR_CODES, INTERNAL, OVER_BUDGET, OVERLOADED, TIMEOUT, UNAVAILABLE,
    UNKNOWN_MODEL, WORKER_LOST,
)


class OpenAIError(Exception):
    """An HTTP error answered in OpenAI's JSON error format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    """A 400 about one request parameter."""
    return OpenAIError(400, message, param=param, code=code)


# ---- fleet error codes -> HTTP ----------------------------------------------------

# code -> (HTTP status, OpenAI error type, OpenAI error code)
FLEET_ERRORS: dict[str, tuple[int, str, str]] = {
    BAD_REQUEST: (400, "invalid_request_error", "bad_request"),
    UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    OVERLOADED: (429, "rate_limit_error", "overloaded"),
    TIMEOUT: (504, "timeout_error", "timeout"),
    UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    OVER_BUDGET: (503, "service_unavailable_error", "over_budget"),
    # The worker died after the request reached it: the upstream failed mid-request.
    WORKER_LOST: (502, "server_error", "worker_lost"),
    # The fleet cancelled it, not this HTTP client (a drain, an operator): retryable.
    CANCELLED: (503, "service_unavailable_error", "cancelled"),
    INTERNAL: (500, "server_error", "internal"),
    # Another request with this id is in flight from the same client (the gateway's ids are fresh).
    DUPLICATE_REQUEST: (409, "invalid_request_error", "duplicate_request"),
    # Raised locally by the client library: an answer from the broker it cannot decode.
    "bad_reply": (502, "server_error", "bad_reply"),
}
_UNMAPPED = ERROR_CODES - FLEET_ERRORS.keys()
if _UNMAPPED:  # import-time check: every protocol error code has an HTTP status
    raise RuntimeError(f"openai_schema: no HTTP mapping for fleet error codes {sorted(_UNMAPPED)}")


def error_from_fleet(code: str, message: str) -> OpenAIError:
    """The HTTP error for a fleet error code (unknown codes are a 500)."""
    status, etype, ecode = FLEET_ERRORS.get(code, (500, "server_error", code))
    return OpenAIError(status, message, type=etype, param="model" if code == UNKNOWN_MODEL else None, code=ecode)
