"""The ingress' front door, before any body is parsed or any model touched: which deployment
answers (every response names it; a request naming another is refused), API keys, body size,
admission (bounded in-flight requests; beyond it a fast 503 with Retry-After)."""

from __future__ import annotations

import dataclasses
import hmac
import os

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import errors, metrics
from serve_app.errors import ErrorKind

# Paths that need no key and are not counted as work: readiness, liveness and the API docs.
OPEN_PATHS = frozenset(
    {"/health", "/livez", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
)
# Names the deployment (serve_app.config.deployment_identity) on every response; a request that
# carries it must reach that deployment or is refused with a 421 (Misdirected Request).
DEPLOYMENT_HEADER = "x-mis-deployment"
DOCS_ASSETS = "/docs-assets"  # the API docs' JS/CSS, served from a package (no CDN)

KEYS_ENV = "MIS_API_KEYS"  # comma-separated; added to the config's api_keys
_BODY_METHODS = ("POST", "PUT", "PATCH")


def is_open(path: str) -> bool:
    """No key needed, not counted as work: liveness, the API docs and their assets."""
    return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")


def route_path(request: Request) -> str:
    """The path inside the app, without the Serve route prefix (ASGI root_path)."""
    return request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"


def _reply(
    request: Request, kind: ErrorKind, message: str, headers: dict[str, str] | None = None
) -> Response:
    """An error in the protocol of the request's path (its body is not read yet)."""
    status, body = errors.render(errors.protocol_of_path(route_path(request)), kind, message)
    return JSONResponse(body, status_code=status, headers=headers)


@dataclasses.dataclass
class Guard:
    api_keys: tuple[bytes, ...]
    max_body_bytes: int
    max_inflight: int
    retry_after_s: int
    deployment: str = ""
    inflight: int = 0

    @classmethod
    def from_settings(
        cls,
        api_keys: list[str],
        max_body_bytes: int,
        max_inflight: int,
        retry_after_s: int,
        deployment: str = "",
    ) -> Guard:
        env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
        keys = tuple(k.encode() for k in [*api_keys, *env])
        return cls(keys, max_body_bytes, max_inflight, retry_after_s, deployment)

    def authorized(self, request: Request) -> bool:
        if not self.api_keys or is_open(route_path(request)):
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Compare against every key, constant-time, so timing says nothing about which failed.
        hits = [hmac.compare_digest(token.strip().encode(), key) for key in self.api_keys]
        return any(hits)

    def declared_too_large(self, request: Request) -> bool:
        """Over max_body_bytes by its Content-Length (or a malformed one)."""
        length = request.headers.get("content-length")
        return length is not None and (not length.isdigit() or int(length) > self.max_body_bytes)

    async def read_capped(self, request: Request) -> bytes | None:
        """A body sent without Content-Length (chunked), read up to max_body_bytes; None as soon
        as it is longer (HAProxy streams it through, so it is read here, not buffered before)."""
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        request = Request(scope, receive)
        wanted = request.headers.get(DEPLOYMENT_HEADER)
        if wanted is not None and wanted != self.deployment:
            reply = _reply(
                request,
                ErrorKind.MISDIRECTED,
                f"{DEPLOYMENT_HEADER}: this is deployment {self.deployment}, not {wanted} (the "
                "request reached another deployment on the same host)",
            )
            return await reply(scope, receive, send)
        if not self.authorized(request):
            reply = _reply(
                request,
                ErrorKind.UNAUTHORIZED,
                "authorization: missing or invalid API key (send 'Authorization: Bearer <key>')",
                {"WWW-Authenticate": "Bearer"},
            )
            return await reply(scope, receive, send)
        if is_open(route_path(request)):
            return await app(scope, receive, send)
        too_large = _reply(
            request, ErrorKind.TOO_LARGE, f"body: larger than max_body_bytes={self.max_body_bytes}"
        )
        if self.declared_too_large(request):
            return await too_large(scope, receive, send)
        if self.inflight >= self.max_inflight:
            reply = _reply(
                request,
                ErrorKind.OVERLOADED,
                f"server busy: {self.inflight} requests in flight on this ingress replica "
                f"(max_inflight_requests={self.max_inflight}); retry later",
                {"Retry-After": str(self.retry_after_s)},
            )
            return await reply(scope, receive, send)
        self.inflight += 1  # counts from here: reading a chunked body is work too
        try:
            if "content-length" not in request.headers and request.method in _BODY_METHODS:
                try:
                    body = await self.read_capped(request)
                except ClientDisconnect:  # nobody to answer
                    return
                if body is None:
                    return await too_large(scope, receive, send)
                receive = _replay(body, receive)
            await app(scope, receive, send)
        finally:
            self.inflight -= 1


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for a route, the body already read: the body once, then the client's events
    (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


# The guard of this process' ingress replica. The middleware reads it through this module at
# call time: Serve pickles the FastAPI app when the deployment is declared, so state kept in the
# ingress module's globals would be frozen at its import-time value.
_active: Guard | None = None


def install(guard: Guard) -> None:
    global _active
    _active = guard


class FrontDoor:
    """The ingress app's middleware: the installed guard (pass-through when none is), and every
    4xx/5xx answer counted by status, the 500 of an unhandled exception too (answered by the
    app's handler outside this middleware). Plain ASGI: Starlette's `@app.middleware("http")`
    costs a task group and a memory stream per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    _count_error(message["status"])
                if _active is not None:
                    header = (DEPLOYMENT_HEADER.encode(), _active.deployment.encode())
                    message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            if _active is None:
                await self.app(scope, receive, counted)
            else:
                await _active(scope, receive, counted, self.app)
        except Exception:
            if not started:  # the app's exception handler (outside this middleware) answers 500
                _count_error(500)
            raise


def _count_error(status: int) -> None:
    metrics.ingress().errors.inc(tags={"code": str(status)})
