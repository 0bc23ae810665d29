"""Error answers in the protocol of the route: what went wrong (an ErrorKind) said as each API
says it, body and status code. Pure pydantic: the ingress, its front door and the tests use it.

    ours    /v1/score, /v1/score/batch, /v1/rerank, /v1/models:
            {"object": "error", "message", "type", "code"} (SGLang's; Cohere's v1 SDK reads
            its `message`)
    vLLM    /score, and /v1/score with vLLM's fields, and /rerank with `documents`:
            {"error": {"message", "type", "param", "code"}}
    TEI     /rerank with `texts`: {"error", "error_type"}, TEI's status per type
    Cohere  /v2/rerank: {"message"}, Cohere's status codes

Before a route has read the body (the front door: key, size, admission; a body that is not
JSON), the path decides: /rerank answers as TEI (its own path there; vLLM's and Jina's clients
post to /v1/rerank).
"""

from __future__ import annotations

import enum
import functools
import operator
import re
from http import HTTPStatus
from typing import Any

from mis_api.schema import ErrorBody, error_body
from serve_app.shapes import CohereError, TeiError, VllmError


class ErrorKind(enum.Enum):
    """What went wrong, whatever the protocol."""

    INVALID = "invalid"  # a field of the request
    LIMIT = "limit"  # over a limit of the deployment (tokens, items)
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not found"  # an unknown model (or path)
    TOO_LARGE = "too large"  # the body
    MISDIRECTED = "misdirected"  # meant for another deployment
    FAILED = "failed"  # a chunk that fails on its own
    INTERNAL = "internal"  # anything unexpected
    OVERLOADED = "overloaded"  # admission full, or the scorers' queues
    UNAVAILABLE = "unavailable"  # no scorer ready, or scorers failing
    TIMEOUT = "timeout"  # limits.request_timeout_s

    @property
    def status(self) -> int:
        """Our status code (every protocol's but TEI's and one of Cohere's)."""
        return _OURS[self][0]

    @property
    def type(self) -> str:
        return _OURS[self][1]


_OURS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID: (400, "BadRequestError"),
    ErrorKind.LIMIT: (400, "BadRequestError"),
    ErrorKind.UNAUTHORIZED: (401, "AuthenticationError"),
    ErrorKind.NOT_FOUND: (404, "NotFoundError"),
    ErrorKind.TOO_LARGE: (413, "PayloadTooLarge"),
    ErrorKind.MISDIRECTED: (421, "MisdirectedRequest"),
    ErrorKind.FAILED: (500, "InternalError"),
    ErrorKind.INTERNAL: (500, "InternalError"),
    ErrorKind.OVERLOADED: (503, "ServiceUnavailable"),
    ErrorKind.UNAVAILABLE: (503, "ServiceUnavailable"),
    ErrorKind.TIMEOUT: (504, "GatewayTimeout"),
}


class Protocol(enum.Enum):
    OURS = "ours"
    VLLM = "vllm"
    TEI = "tei"
    COHERE = "cohere"


# A message over a limit names it (models/inputs.py, the batch cap): "... exceed max_xxx=".
_LIMIT = re.compile(r" exceeds? (?:\w+\.)?max_\w+=")  # a request's own: long_items.max_tokens=


def input_kind(message: str) -> ErrorKind:
    """INVALID, or LIMIT for a message that says a limit was passed."""
    return ErrorKind.LIMIT if _LIMIT.search(message) else ErrorKind.INVALID


# TEI: (status, error_type) by kind. TEI answers its own input checks as Validation (413: an
# input over the token limit, a batch over the client batch size), a body it cannot read as
# 422, an engine failure as Backend (424), a full queue as Overloaded (429), not ready as
# Unhealthy (503); its ErrorType has nothing for a key, a path or a deadline, so those keep
# our status with the closest type.
_TEI: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID: (422, "Validation"),
    ErrorKind.LIMIT: (413, "Validation"),
    ErrorKind.UNAUTHORIZED: (401, "Validation"),
    ErrorKind.NOT_FOUND: (404, "Validation"),
    ErrorKind.TOO_LARGE: (413, "Validation"),
    ErrorKind.MISDIRECTED: (421, "Validation"),
    ErrorKind.FAILED: (424, "Backend"),
    ErrorKind.INTERNAL: (500, "Backend"),
    ErrorKind.OVERLOADED: (429, "Overloaded"),
    ErrorKind.UNAVAILABLE: (503, "Unhealthy"),
    ErrorKind.TIMEOUT: (504, "Backend"),
}
# Cohere: its statuses (docs.cohere.com/reference/errors); a full server is 429 Too Many
# Requests there (the SDK retries 429 and 5xx, after Retry-After).
_COHERE_STATUS = {ErrorKind.OVERLOADED: 429}
# vLLM: `type` as vLLM names it (create_error_response), else the status' phrase.
_VLLM_TYPE = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
_FIELD = re.compile(r"^([\w.\[\]]+): ")


def render(protocol: Protocol, kind: ErrorKind, message: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of an error in `protocol`."""
    match protocol:
        case Protocol.OURS:
            return kind.status, error_body(message, kind.status, kind.type)
        case Protocol.VLLM:
            status = kind.status
            kind_name = _VLLM_TYPE.get(status, HTTPStatus(status).phrase)
            param = m[1] if (m := _FIELD.match(message)) else None
            info = {"message": message, "type": kind_name, "param": param, "code": status}
            return status, {"error": info}
        case Protocol.TEI:
            status, error_type = _TEI[kind]
            return status, {"error": message, "error_type": error_type}
        case Protocol.COHERE:
            return _COHERE_STATUS.get(kind, kind.status), {"message": message}


def protocol_of_path(path: str) -> Protocol:
    """The protocol of a route's errors before its body is read (see the module's text)."""
    match path:
        case "/v2/rerank":
            return Protocol.COHERE
        case "/score":
            return Protocol.VLLM
        case "/rerank":
            return Protocol.TEI
        case _:
            return Protocol.OURS


_MODELS = {
    Protocol.OURS: ErrorBody,
    Protocol.VLLM: VllmError,
    Protocol.TEI: TeiError,
    Protocol.COHERE: CohereError,
}
_EXAMPLES = {
    ErrorKind.INVALID: "items[3]: must not be empty",
    ErrorKind.LIMIT: "items[3]: 600 tokens exceed max_item_tokens=512",
    ErrorKind.UNAUTHORIZED: "authorization: missing or invalid API key",
    ErrorKind.NOT_FOUND: "model: unknown model",
    ErrorKind.TOO_LARGE: "body: larger than max_body_bytes",
    ErrorKind.MISDIRECTED: "x-mis-deployment: this is deployment 0123456789abcdef, not ...",
    ErrorKind.FAILED: "items: chunk 2 of 5: replica abc: scoring failed: ...",
    ErrorKind.INTERNAL: "internal error; see the server log",
    ErrorKind.OVERLOADED: "server busy: ...; retry later (Retry-After)",
    ErrorKind.UNAVAILABLE: "no scorer replica is ready yet (...); retry later (Retry-After)",
    ErrorKind.TIMEOUT: "request timed out after request_timeout_s=300.0",
}


def openapi_responses(*protocols: Protocol) -> dict[int | str, dict[str, Any]]:
    """A route's error answers for its OpenAPI document: every status its protocols answer
    with, the body of each protocol that answers it (any of them where several do)."""
    by_status: dict[int, dict[Protocol, list[ErrorKind]]] = {}
    for protocol in protocols:
        for kind in ErrorKind:
            status, _ = render(protocol, kind, "")
            by_status.setdefault(status, {}).setdefault(protocol, []).append(kind)
    out: dict[int | str, dict[str, Any]] = {}
    for status, answering in sorted(by_status.items()):
        models = [_MODELS[p] for p in answering]
        kinds = next(iter(answering.values()))
        first = next(iter(answering))
        example = render(first, kinds[0], _EXAMPLES[kinds[0]])[1]
        out[status] = {
            "model": functools.reduce(operator.or_, models),  # one model, or any of them
            "description": "; ".join(dict.fromkeys(_EXAMPLES[k] for k in kinds)),
            "content": {"application/json": {"example": example}},
        }
    return out
