"""The ingress' front door, before any body is parsed or any model touched: API keys, body size,
admission (bounded in-flight requests; beyond it a fast 503 with Retry-After)."""

from __future__ import annotations

import dataclasses
import hmac
import os
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from serve_app.schema import error_body

# Paths that need no key and are not counted as work: liveness and the API docs.
OPEN_PATHS = frozenset({"/health", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
DOCS_ASSETS = "/docs-assets"  # the API docs' JS/CSS, served from a package (no CDN)

KEYS_ENV = "MIS_API_KEYS"  # comma-separated; added to the config's api_keys


def is_open(path: str) -> bool:
    """No key needed, not counted as work: liveness, the API docs and their assets."""
    return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")


def _route_path(request: Request) -> str:
    """The path inside the app, without the Serve route prefix (ASGI root_path)."""
    return request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"


def _reply(message: str, code: int, kind: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error_body(message, code, kind), status_code=code, headers=headers)


@dataclasses.dataclass
class Guard:
    api_keys: tuple[bytes, ...]
    max_body_bytes: int
    max_inflight: int
    retry_after_s: int
    inflight: int = 0

    @classmethod
    def from_settings(
        cls, api_keys: list[str], max_body_bytes: int, max_inflight: int, retry_after_s: int
    ) -> Guard:
        env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
        keys = tuple(k.encode() for k in [*api_keys, *env])
        return cls(keys, max_body_bytes, max_inflight, retry_after_s)

    def authorized(self, request: Request) -> bool:
        if not self.api_keys or is_open(_route_path(request)):
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Compare against every key, constant-time, so timing says nothing about which failed.
        hits = [hmac.compare_digest(token.strip().encode(), key) for key in self.api_keys]
        return any(hits)

    async def body_too_large(self, request: Request) -> bool:
        length = request.headers.get("content-length")
        if length is not None:
            return not length.isdigit() or int(length) > self.max_body_bytes
        if request.method in ("POST", "PUT", "PATCH"):
            # Chunked upload: Serve's proxy has buffered it already; the body is cached for
            # the route, so reading it here costs no second copy from the network.
            return len(await request.body()) > self.max_body_bytes
        return False

    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not self.authorized(request):
            return _reply(
                "authorization: missing or invalid API key (send 'Authorization: Bearer <key>')",
                401,
                "AuthenticationError",
                {"WWW-Authenticate": "Bearer"},
            )
        if is_open(_route_path(request)):
            return await call_next(request)
        if await self.body_too_large(request):
            return _reply(
                f"body: larger than max_body_bytes={self.max_body_bytes}", 413, "PayloadTooLarge"
            )
        if self.inflight >= self.max_inflight:
            return _reply(
                f"server busy: {self.inflight} requests in flight on this ingress replica "
                f"(max_inflight_requests={self.max_inflight}); retry later",
                503,
                "ServiceUnavailable",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.inflight += 1
        try:
            return await call_next(request)
        finally:
            self.inflight -= 1


# The guard of this process' ingress replica. The middleware reads it through this module at
# call time: Serve pickles the FastAPI app when the deployment is declared, so state kept in the
# ingress module's globals would be frozen at its import-time value.
_active: Guard | None = None


def install(guard: Guard) -> None:
    global _active
    _active = guard


async def front_door(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
    """Starlette HTTP middleware: the installed guard, or pass-through when none is."""
    return await (call_next(request) if _active is None else _active(request, call_next))
