"""HTTP ingress: validate and tokenize, split into chunks, fan out to scorers, merge in order.
`/v1/score` and `/v1/rerank` share that path; the API docs are served without a CDN.

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations
at import time to build the request models and the OpenAPI schema.
"""

import asyncio
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.checkpoint import ensure_demo_checkpoint, has_random_weights, read_hf_config
from models.inputs import Chunk, ScoringInputError
from models.tokenizer import TextTokenizer
from serve_app import guard, metrics
from serve_app.config import IngressArgs, scoring_key
from serve_app.rerank import RerankRequest, RerankResponse, label_ids, rerank_response
from serve_app.schema import (
    ErrorBody,
    ScoreRequest,
    ScoreResponse,
    Usage,
    error_body,
    format_errors,
)
from serve_app.scorer import EngineFailure
from serve_app.scoring import (
    make_chunks,
    merge_scores,
    prepare_request,
    prompt_tokens,
    response_body,
)

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="mis-serve",
    description="Multi-item scoring: P(label token | query ++ item) for every item.",
    version="0.1.0",
    docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN: served below instead
    redoc_url=None,
)


def _docs_assets() -> Path:
    """Swagger UI and ReDoc as files of the fastapi-offline package (located, not imported)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package fastapi-offline is not installed (pip install mis-serve)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


api.mount(guard.DOCS_ASSETS, StaticFiles(directory=_docs_assets()), name="docs-assets")


def _docs_urls(request: Request) -> tuple[str, str]:
    """(OpenAPI URL, assets URL) under the app's route prefix."""
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{root}/openapi.json", f"{root}{guard.DOCS_ASSETS}"


@api.get("/docs", include_in_schema=False)
async def _swagger_ui(request: Request) -> HTMLResponse:
    spec, assets = _docs_urls(request)
    return get_swagger_ui_html(
        openapi_url=spec,
        title=f"{api.title} - API docs",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
    )


@api.get("/redoc", include_in_schema=False)
async def _redoc(request: Request) -> HTMLResponse:
    spec, assets = _docs_urls(request)
    return get_redoc_html(
        openapi_url=spec,
        title=f"{api.title} - API docs",
        redoc_js_url=f"{assets}/redoc.standalone.js",
        redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "model": ErrorBody,
        "description": text,
        "content": {"application/json": {"example": error_body(text, code)}},
    }
    for code, text in [
        (400, "items[3]: must not be empty"),
        (401, "authorization: missing or invalid API key"),
        (404, "model: unknown model"),
        (413, "body: larger than max_body_bytes"),
        (503, "server busy (Retry-After), or scorer replicas failed"),
        (504, "request timed out after request_timeout_s"),
    ]
}


@api.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(format_errors(exc.errors()), 400), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
    return JSONResponse(
        error_body(str(exc.detail), exc.status_code, kind), status_code=exc.status_code
    )


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Not the client's fault (bad input never gets here): a JSON body, the details in the log.
    log.exception("internal error: %s", type(exc).__name__)
    return JSONResponse(error_body("internal error; see the server log", 500, "InternalError"), 500)


_ERROR_KINDS = {404: "NotFoundError", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


def _error(message: str, code: int = 400, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = _ERROR_KINDS.get(code, "BadRequestError")
    return JSONResponse(error_body(message, code, kind), status_code=code, headers=headers)


class ReplicaFailure(Exception):
    """A chunk's scorer replica died on every try."""


class _Refused(Exception):
    """A request answered with an error body (message naming the field, status, headers)."""

    def __init__(self, message: str, code: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.headers = code, headers

    def response(self, field_names: dict[str, str] | None = None) -> JSONResponse:
        message = str(self)
        for ours, theirs in (field_names or {}).items():  # the route's own field names
            if message.startswith(ours):
                message = theirs + message[len(ours) :]
        return _error(message, self.code, self.headers)


# Keys, body size, admission, before any parsing; counts every error answer (its own too).
api.add_middleware(guard.FrontDoor)


@serve.deployment(name="ScoreIngress", max_ongoing_requests=256)
@serve.ingress(api)
class ScoreIngress:
    def __init__(self, scorer: DeploymentHandle, args: IngressArgs):
        self.args = IngressArgs.model_validate(args)
        path = Path(self.args.model.path or ensure_demo_checkpoint(self.args.model.demo_preset))
        self.model_name = self.args.model.name or path.name
        self.vocab_size = int(read_hf_config(path)["vocab_size"])
        self.random_weights = has_random_weights(path)
        try:
            self.tokenizer: TextTokenizer | None = TextTokenizer.from_model_dir(path)
        except FileNotFoundError:
            self.tokenizer = None
        self.scorer = scorer
        self.scoring_key = scoring_key(self.args.model, self.args.engine)
        self.rerank_prompt = self.args.rerank.prompt()
        self.rerank_labels = (  # a label that is not one token fails the start, loudly
            None
            if self.tokenizer is None
            else label_ids(self.tokenizer.encode, self.args.rerank.labels)
        )
        limits = self.args.limits
        front = guard.Guard.from_settings(
            [k.get_secret_value() for k in self.args.auth.api_keys],
            limits.max_body_bytes,
            limits.max_inflight_requests,
            limits.retry_after_s,
        )
        guard.install(front)
        log.info(
            "ingress ready: model %s (%s)%s, %d API keys, settings %s",
            self.model_name,
            path,
            " RANDOM WEIGHTS" if self.random_weights else "",
            len(front.api_keys),
            self.args.model_dump(mode="json", exclude={"auth"}),
        )

    @api.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
    async def score(self, body: ScoreRequest) -> Any:
        """Scores of every item, in item order (SGLang-compatible)."""
        try:
            response, headers = await self._score(body, "score")
        except _Refused as e:
            return e.response()
        return JSONResponse(response, headers=headers)

    @api.post("/v1/rerank", response_model=RerankResponse, responses=_ERRORS)
    async def rerank(self, body: RerankRequest) -> Any:
        """Documents sorted by relevance to the query (Cohere / Jina compatible): P(yes) of
        each document in the rerank prompt, all documents in one multi-item fan-out."""
        try:
            if self.rerank_labels is None:
                raise _Refused("query: /v1/rerank needs the model's tokenizer.json")
            request = self.rerank_prompt.score_request(body, self.rerank_labels)
            response, headers = await self._score(request, "rerank")
        except _Refused as e:
            return e.response({"items": "documents"})
        usage = Usage.model_validate(response["usage"])
        out = rerank_response(body, response["scores"], self.model_name, usage)
        return JSONResponse(out.model_dump(exclude_none=True), headers=headers)

    async def _score(self, body: ScoreRequest, route: str) -> tuple[dict, dict[str, str]]:
        """Validate, split into chunks, fan out, merge in item order; raises _Refused."""
        start = time.perf_counter()
        if body.model is not None and body.model != self.model_name:
            raise _Refused(f"model: unknown model {body.model!r}; serving {self.model_name!r}", 404)
        try:
            query, items = prepare_request(
                body,
                self.tokenizer,
                vocab_size=self.vocab_size,
                engine=self.args.engine,
                max_items=self.args.limits.max_items_per_request,
            )
        except ScoringInputError as e:
            raise _Refused(str(e)) from e
        fanout = self.args.fanout
        chunks = make_chunks(body, query, items, fanout.chunk_items, fanout.chunk_tokens)
        timeout_s = self.args.limits.request_timeout_s
        pending: list[DeploymentResponse] = []
        remaining = timeout_s - (time.perf_counter() - start)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(self._score_chunk(c, (i, len(chunks)), pending) for i, c in enumerate(chunks))
                ),
                remaining,
            )
        except ScoringInputError as e:
            raise _Refused(str(e)) from e
        except TimeoutError as e:
            for r in pending:  # chunks not started yet are dropped from the scorers' queues
                r.cancel()
            log.warning(
                "request of %d items timed out after %.1f s; %d chunk calls cancelled",
                len(items),
                timeout_s,
                len(pending),
            )
            raise _Refused(f"request timed out after request_timeout_s={timeout_s}", 504) from e
        except ReplicaFailure as e:
            for r in pending:
                r.cancel()
            retry = str(self.args.limits.retry_after_s)
            raise _Refused(str(e), 503, {"Retry-After": retry}) from e
        scores = merge_scores([r.scores for r in results], len(body.label_token_ids))
        replicas = sorted({r.replica for r in results})
        n_tokens = prompt_tokens(query, items)
        elapsed = time.perf_counter() - start
        log.info(
            "%s: %d items in %d chunks on %d replicas in %.1f ms",
            route,
            len(items),
            len(chunks),
            len(replicas),
            1e3 * elapsed,
        )
        m = metrics.ingress()
        m.request_latency.observe(elapsed, tags={"route": route})
        m.chunks.observe(len(chunks))
        if items:  # Ray counters refuse increments of 0
            m.items.inc(len(items))
            m.tokens.inc(n_tokens)
        response = response_body(scores, self.model_name, n_tokens)
        return response, {"X-MIS-Replicas": ",".join(replicas), "X-MIS-Chunks": str(len(chunks))}

    async def _score_chunk(
        self, chunk: Chunk, part: tuple[int, int], pending: list[DeploymentResponse]
    ) -> Any:
        """Chunk `part` = (i, k) of a request on some replica; retried elsewhere (bounded) when
        its replica dies or its engine fails, so a request gets all of its scores or an error,
        never part of them."""
        start, tries = time.perf_counter(), self.args.fanout.retries + 1
        for attempt in range(tries):
            response = self.scorer.score.remote(chunk, part=part, key=self.scoring_key)
            pending.append(response)
            try:
                result = await response
                metrics.ingress().chunk_latency.observe(time.perf_counter() - start)
                return result
            except BackPressureError as e:
                raise ReplicaFailure(f"scorers overloaded ({e}); retry later") from e
            except (RayActorError, ActorUnavailableError, EngineFailure) as e:
                log.warning(
                    "chunk of %d items: scorer replica failed (try %d of %d): %s",
                    len(chunk.items),
                    attempt + 1,
                    tries,
                    type(e).__name__,
                )
                # Give the router a moment to learn the replica is gone, or the retry may
                # be routed to it again.
                await asyncio.sleep(0.2 * 2**attempt)
        raise ReplicaFailure(f"scorer replicas failed {tries} times for one chunk; retry later")

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "owned_by": "mis-serve",
                    "random_weights": self.random_weights,
                }
            ],
        }
