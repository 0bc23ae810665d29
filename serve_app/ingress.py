"""HTTP ingress: validate and tokenize, split into chunks, fan out to scorers, merge in order.
`/v1/score` and `/v1/rerank` share that path; the API docs are served without a CDN.

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations
at import time to build the request models and the OpenAPI schema.
"""

import asyncio
import dataclasses
import functools
import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from mis_api.long_items import REFUSE, LongItems, Windows
from mis_api.schema import (
    ScoreRequest,
    ScoreResponse,
    Usage,
    error_body,
    format_errors,
    validation_message,
)
from mis_api.scoring import (
    make_chunks,
    merge_scores,
    prepare_request,
    prompt_tokens,
    response_body,
)
from models.adapters import adapter_classes, check_head_room, head_width, load_checked_adapter
from models.checkpoint import ensure_demo_checkpoint, has_random_weights, read_hf_config
from models.config import from_hf_config
from models.inputs import Chunk, ScoringInputError
from models.tokenizer import TextTokenizer
from serve_app import errors, guard, metrics, shapes
from serve_app.adapter_checks import AdapterChecks
from serve_app.chunk_call import ChunkFailure, ChunkResult
from serve_app.config import IngressArgs, IngressUserConfig, deployment_identity, scoring_key
from serve_app.errors import ErrorKind, Protocol
from serve_app.fanout import ChunkCaller, DeadlineExceeded, FanOut, ReplicaFailure, cause
from serve_app.rerank import (
    COHERE_V1,
    RerankRequest,
    RerankResponse,
    label_ids,
    rerank_response,
)
from serve_app.routing import running_replicas

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


def _error(protocol: Protocol, kind: ErrorKind, message: str, headers=None) -> JSONResponse:
    status, body = errors.render(protocol, kind, message)
    return JSONResponse(body, status_code=status, headers=headers)


def _path_protocol(request: Request) -> Protocol:
    """The protocol of a route's errors answered before the route read its body."""
    return errors.protocol_of_path(guard.route_path(request))


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = format_errors(exc.errors())
    return _error(_path_protocol(request), errors.input_kind(message), message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # A body FastAPI cannot read (400), a path that does not exist (404), in the protocol of
    # the path; 405 and the like in ours, with their own status.
    kinds = {400: ErrorKind.INVALID, 404: ErrorKind.NOT_FOUND, 413: ErrorKind.TOO_LARGE}
    if (kind := kinds.get(exc.status_code)) is not None:
        return _error(_path_protocol(request), kind, str(exc.detail))
    return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Not the client's fault (bad input never gets here): a JSON body, the details in the log.
    log.exception("internal error: %s", type(exc).__name__)
    message = "internal error; see the server log"
    return _error(_path_protocol(request), ErrorKind.INTERNAL, message)


class _Refused(Exception):
    """A request answered with an error (message naming the field, what went wrong, headers),
    in the protocol of its route (serve_app/errors.py)."""

    def __init__(
        self,
        message: str,
        kind: ErrorKind | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.kind = kind or errors.input_kind(message)
        self.headers = headers

    def renamed(self, rename: Callable[[str], str]) -> "_Refused":
        """The same refusal, its fields named as the route's request names them."""
        return _Refused(rename(str(self)), self.kind, self.headers)

    def response(self, protocol: Protocol = Protocol.OURS) -> JSONResponse:
        return _error(protocol, self.kind, str(self), self.headers)

    def body(self) -> dict[str, Any]:
        """Our error body alone (a batch entry's)."""
        return errors.render(Protocol.OURS, self.kind, str(self))[1]


def _named(names: dict[str, str]) -> Callable[[str], str]:
    """A message's leading field renamed (`items[3]: ...` -> `documents[3]: ...`), and the
    long-item options it names anywhere (`... exceed long_items.max_tokens=5`)."""

    def rename(message: str) -> str:
        for ours, theirs in names.items():
            if message.startswith(ours):
                message = theirs + message[len(ours) :]
                break
        for ours, theirs in names.items():
            if ours.startswith("long_items"):
                message = message.replace(ours, theirs)
        return message

    return rename


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A score request checked, tokenized and cut into chunks: ready to fan out."""

    body: ScoreRequest
    query: list[int]
    items: list[list[int]]  # as scored: cut, suffixed, windows
    chunks: list[Chunk]
    windows: Windows | None  # long_items chunk: which scored items are whose windows
    # Its model's head when it was checked: read back after scoring, whatever a reconfigure
    # changed meanwhile.
    head: tuple[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class _Scored:
    """A score request's answer: the /v1/score body and the X-MIS headers."""

    response: dict[str, Any]
    headers: dict[str, str]
    head: tuple[str, tuple[str, ...]]  # the head that scored it (_Prepared.head)


def _parse(model: type[BaseModel], body: Any) -> Any:
    """A body of one of the shapes routes tell apart by its fields; 400 naming the field."""
    if not isinstance(body, dict):
        raise _Refused("body: must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _Refused(validation_message(e)) from e


def _one_of(*models: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its body itself: any of `models` (told
    apart by their fields)."""
    schemas = [m.model_json_schema(ref_template="#/components/schemas/{model}") for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _internal(convert: Any) -> Any:
    """`convert()`: a request of another shape turned into the internal one; 400 naming the
    field when what it holds is not a valid internal request (e.g. an empty query)."""
    try:
        return convert()
    except ValidationError as e:
        raise _Refused(validation_message(e)) from e


def _answered(answer: Any) -> Any:
    """A job's answer, or its refusal raised (a route that answers one job, or all or none)."""
    if isinstance(answer, _Refused):
        raise answer
    return answer


def _head_of(classes: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """An adapter's head: "classification" with its classes, or "lm"."""
    return ("classification" if classes else "lm"), classes


_ANY_BODY = Body(default=None)  # parsed by the route (_parse): its shape depends on its fields

# Keys, body size, admission, before any parsing; counts every error answer (its own too).
api.add_middleware(guard.FrontDoor)


@serve.deployment(name="ScoreIngress", max_ongoing_requests=256)
@serve.ingress(api)
class ScoreIngress:
    def __init__(self, scorer: DeploymentHandle, args: IngressArgs):
        self.args = IngressArgs.model_validate(args)
        path = Path(self.args.model.path or ensure_demo_checkpoint(self.args.model.demo_preset))
        self.model_name = self.args.model.name or path.name
        self.served_names = (self.model_name, *self.args.model.served_names)
        if clash := set(self.served_names) & set(self.args.model.adapters):
            raise ValueError(f"model.adapters: {sorted(clash)} also name the base model")
        model = from_hf_config(read_hf_config(path))  # what the scorers load, checked the same
        self.vocab_size = model.vocab_size
        self._model_cfg = model
        # "lm" (scores at label tokens) or "classification" (class scores, no label ids).
        self.head = (model.head.value, model.class_labels)
        # An adapter with its own classification head (modules_to_save) scores its classes,
        # also on an LM base (which it turns into a classifier).
        self.adapter_heads = {
            name: _head_of(adapter_classes(adapter, model))
            for name, adapter in self.args.model.adapters.items()
        }
        # The scorers' adapter heads program width (fixed at their start): a head added at
        # run time must fit it.
        self._head_width = head_width(model, (len(c) for _, c in self.adapter_heads.values()))
        # Adapters by name: model.adapters, and those added at run time (reconfigure); names
        # being checked, and those refused with why.
        self.adapters = dict(self.args.model.adapters)
        self._runtime: dict[str, tuple[str, str]] = {}  # name -> (directory, digest)
        self._checking: set[str] = set()
        self._checks = AdapterChecks()
        self._refused: dict[str, str] = {}
        self._config_error: str | None = None  # why the last user_config changed nothing
        k = self.args.rerank.class_index
        for name, (_, classes) in {self.model_name: self.head, **self.adapter_heads}.items():
            if classes and not -len(classes) <= k < len(classes):
                raise ValueError(f"rerank.class_index {k} is not a class of {name}: {classes}")
        self.random_weights = has_random_weights(path)
        try:
            self.tokenizer: TextTokenizer | None = TextTokenizer.from_model_dir(path)
        except FileNotFoundError:
            self.tokenizer = None
        self.scorer = scorer
        if not scorer.is_initialized:  # its router hears of ready replicas from now on
            scorer._init()
        self._scorers = f"{scorer.app_name}#{scorer.deployment_name}"
        self.deployment = deployment_identity(serve.get_replica_context().app_name)
        self.scoring_key = scoring_key(self.args.model, self.args.engine, self.deployment)
        self._call = ChunkCaller(scorer, self.scoring_key, self.args.fanout.retries)
        self.rerank_prompt = self.args.rerank.prompt()
        if self.tokenizer is not None:
            self._check_rerank_template(self.tokenizer)
        self.rerank_labels = (  # a label that is not one token fails the start, loudly
            None
            if self.tokenizer is None
            else ()  # a classification model reads its class (rerank.class_index) instead
            if self.head[0] == "classification"
            else label_ids(self.tokenizer.encode, self.args.rerank.labels)
        )
        limits = self.args.limits
        front = guard.Guard.from_settings(
            [k.get_secret_value() for k in self.args.auth.api_keys],
            limits.max_body_bytes,
            limits.max_inflight_requests,
            limits.retry_after_s,
            self.deployment,
        )
        guard.install(front)
        log.info(
            "ingress ready: deployment %s, model %s (%s)%s, %d API keys, settings %s",
            self.deployment,
            self.model_name,
            path,
            " RANDOM WEIGHTS" if self.random_weights else "",
            len(front.api_keys),
            self.args.model_dump(mode="json", exclude={"auth"}),
        )

    async def reconfigure(self, user_config: Any) -> None:
        """Serve's user_config (IngressUserConfig), at start and whenever only it changes: the
        adapters added at run time. Each new or re-pointed one is checked in full (a request
        naming a new one meanwhile gets a 503 with Retry-After; a re-pointed one is served
        from its old files until the new ones pass); a bad one is refused and logged, and so
        is a user_config of the wrong shape (the adapters stay as they were): it never fails
        the deployment. One no longer listed is no longer served."""
        try:
            settings = IngressUserConfig.model_validate(user_config or {})
        except ValidationError as e:
            self._config_error = f"user_config refused, adapters unchanged: {validation_message(e)}"
            log.error("%s", self._config_error)
            return
        self._config_error = None
        wanted, timeout = settings.adapters, settings.check_timeout_s
        for name in set(self._runtime) - set(wanted):
            self._drop(name)
            log.info("adapter %r: removed (no longer in user_config)", name)
        self._refused = {n: r for n, r in self._refused.items() if n in wanted}
        changed = [n for n, d in wanted.items() if self._runtime.get(n, ("",))[0] != d]
        self._checking = set(changed)
        try:
            for name in changed:
                directory = wanted[name]
                check = functools.partial(self._check_runtime, name, directory)
                try:
                    head, digest = await self._checks.run(directory, check, timeout)
                except Exception as e:  # whatever a directory holds, never the deployment
                    self._refused[name] = f"{directory}: {type(e).__name__}: {e}"
                    log.error("adapter %r refused: %s", name, self._refused[name])
                    continue
                finally:
                    self._checking.discard(name)
                self._refused.pop(name, None)
                self._runtime[name] = (directory, digest)
                self.adapters[name] = directory
                self.adapter_heads[name] = head
                self._publish()
                log.info("adapter %r: served from %s (sha256 %s)", name, directory, digest[:12])
        finally:
            self._checking = set()

    def _drop(self, name: str) -> None:
        if self._runtime.pop(name, None) is not None:
            del self.adapters[name], self.adapter_heads[name]
            self._publish()

    def _publish(self) -> None:
        """The run-time adapters the scorers are told of, as the ingress now serves them: in
        the same step as the change, so a request never names one the scorers are not told
        of, nor meets another head than its adapter's."""
        table = tuple(sorted((n, d, digest) for n, (d, digest) in self._runtime.items()))
        self._call = dataclasses.replace(self._call, adapters=table)

    def _check_runtime(self, name: str, directory: str) -> tuple[tuple[str, tuple[str, ...]], str]:
        """The head and digest of adapter `directory` to be served as `name`, checked as the
        scorers will (its files in full, its head against their head program); raises why
        not."""
        if name in self.served_names or name in self.args.model.adapters:
            raise ValueError(f"adapters: {name!r} already names the base or a model.adapters one")
        if not self.args.engine.max_adapters:
            raise ValueError("engine.max_adapters: 0 device slots; set it to serve adapters")
        max_rank = self.args.engine.max_lora_rank
        adapter, digest = load_checked_adapter(directory, self._model_cfg, max_rank)
        check_head_room(adapter, self._head_width)
        k = self.args.rerank.class_index
        if (classes := adapter.class_labels) and not -len(classes) <= k < len(classes):
            raise ValueError(f"rerank.class_index {k} is not a class of it: {classes}")
        return _head_of(classes), digest

    def _check_rerank_template(self, tokenizer: TextTokenizer) -> None:
        """A document template whose frame leaves no room for a document fails the start; one
        tokenized differently in parts than whole is said in the log (its scores differ from
        the whole prompt's in those tokens)."""
        head, _, after = self.rerank_prompt.frame()
        frame = len(tokenizer.encode(head) if head else []) + len(tokenizer.encode(after))
        if frame >= self.args.engine.max_item_tokens:
            raise ValueError(
                f"rerank.document_template: its {frame} tokens around {{document}} leave no "
                f"room for a document within engine.max_item_tokens="
                f"{self.args.engine.max_item_tokens}"
            )
        if (probe := self.rerank_prompt.split_differs(tokenizer.encode)) is not None:
            log.warning(
                "rerank.document_template: the document %r tokenizes differently between the "
                "template's parts than in the whole prompt; documents are tokenized apart from "
                "the parts (so a cut never touches them), so such tokens differ",
                probe,
            )

    @api.post(
        "/v1/score",
        response_model=ScoreResponse | shapes.VllmScoreResponse,
        responses=errors.openapi_responses(Protocol.OURS, Protocol.VLLM),
        # Documented as SGLang's body; vLLM's is documented at /score.
        openapi_extra=_one_of(ScoreRequest),
    )
    async def score(self, body: Any = _ANY_BODY) -> Any:
        """Scores of every item, in item order (SGLang's Score API); a body with vLLM's fields
        (`text_1`/`text_2` or `queries`/`documents`) is vLLM's score API (as at /score)."""
        if shapes.is_vllm_score(body):
            return await self.vllm_score(body)
        start = time.perf_counter()
        try:
            scored = await self._score_one(_parse(ScoreRequest, body), "score", start)
        except _Refused as e:
            return e.response()
        return JSONResponse(scored.response, headers=scored.headers)

    @api.post(
        "/v1/score/batch",
        response_model=shapes.BatchScoreResponse,
        responses=errors.openapi_responses(Protocol.OURS),
    )
    async def score_batch(self, body: shapes.BatchScoreRequest) -> Any:
        """Several Score API requests in one body, answered in the same order: each entry its
        /v1/score response or its own error body (one bad entry, or one whose chunk fails,
        fails only itself). All entries' chunks are fanned out together, under one deadline:
        what no entry can be answered through (no scorer ready, overloaded: 503 with
        Retry-After; the deadline: 504) is the answer to the request itself."""
        start = time.perf_counter()
        entries: list[ScoreRequest | _Refused] = []
        for raw in body.requests:
            try:
                entries.append(_parse(ScoreRequest, raw))
            except _Refused as e:
                entries.append(e)  # the error body /v1/score would answer
        n_items = sum(len(e.items) for e in entries if isinstance(e, ScoreRequest))
        cap = self.args.limits.max_items_per_batch
        if n_items > cap:
            message = f"requests: {n_items} items in all exceed max_items_per_batch={cap}"
            return _Refused(message, ErrorKind.LIMIT).response()
        prepared = [e if isinstance(e, _Refused) else self._try_prepare(e) for e in entries]
        jobs = [p for p in prepared if isinstance(p, _Prepared)]
        if (n_scored := sum(len(job.items) for job in jobs)) > cap:  # documents cut in windows
            message = (
                f"requests: {n_scored} items as scored (windows) exceed max_items_per_batch={cap}"
            )
            return _Refused(message, ErrorKind.LIMIT).response()
        try:
            answers = iter(await self._run(jobs, "batch", start))
        except _Refused as e:
            return e.response()
        responses = [next(answers) if isinstance(p, _Prepared) else p for p in prepared]
        out = [r.response if isinstance(r, _Scored) else r.body() for r in responses]
        return JSONResponse({"object": "batch", "responses": out})

    @api.post(
        "/score",
        response_model=shapes.VllmScoreResponse,
        responses=errors.openapi_responses(Protocol.VLLM),
        openapi_extra=_one_of(shapes.VllmScoreRequest),
    )
    async def vllm_score(self, body: Any = _ANY_BODY) -> Any:
        """vLLM's score API: `text_1`/`text_2` (1:1, 1:N, N:N) or `queries`/`documents`; each
        pair's score is what /v1/rerank gives it (P(yes) in the rerank prompt). One rerank per
        distinct query, all in one fan-out."""
        start = time.perf_counter()
        try:
            request = _parse(shapes.VllmScoreRequest, body)
            reranks, where = _internal(request.reranks)
            jobs = []
            for group, rerank in enumerate(reranks):
                try:
                    jobs.append(self._prepare(self._rerank_request(rerank, REFUSE)))
                except _Refused as e:
                    raise e.renamed(functools.partial(request.name_fields, group=group)) from e
            answers = await self._run(jobs, "rerank", start)
            for group, answer in enumerate(answers):
                if isinstance(answer, _Refused):
                    raise answer.renamed(functools.partial(request.name_fields, group=group))
        except _Refused as e:
            return e.response(Protocol.VLLM)
        relevance = [self._relevance(a) for a in answers]  # type: ignore[arg-type]
        scores = [relevance[r][0][d][0] for r, d in where]
        tokens = sum(r[1] for r in relevance)
        model = request.model or self.model_name
        return JSONResponse(shapes.vllm_response(scores, model, tokens).model_dump())

    @api.post(
        "/v2/rerank",
        response_model=shapes.CohereV2RerankResponse,
        responses=errors.openapi_responses(Protocol.COHERE),
    )
    async def rerank_v2(self, body: shapes.CohereV2RerankRequest) -> Any:
        """Cohere's v2 rerank (`cohere.ClientV2(base_url=...).rerank(...)`); scores as
        /v1/rerank's."""
        start = time.perf_counter()
        try:
            scores, tokens, _, _ = await self._rerank_scores(_internal(body.rerank), start, REFUSE)
        except _Refused as e:
            names = {"items": "documents", "long_items.max_tokens": "max_tokens_per_doc"}
            return e.renamed(_named(names)).response(Protocol.COHERE)
        usage = Usage(prompt_tokens=tokens, total_tokens=tokens)
        return JSONResponse(shapes.cohere_v2_response(body, scores, usage).model_dump())

    @api.post(
        "/rerank",
        response_model=RerankResponse | list[shapes.TeiRank],
        responses=errors.openapi_responses(Protocol.TEI, Protocol.VLLM),
        openapi_extra=_one_of(RerankRequest, shapes.TeiRerankRequest),
    )
    async def rerank_any(self, body: Any = _ANY_BODY) -> Any:
        """vLLM's and Jina's `/rerank` (`documents`: as /v1/rerank), or TEI's (`texts`:
        `[{index, score, text?}]` best first, `raw_scores` the logit of P(yes))."""
        if not (isinstance(body, dict) and "texts" in body):
            try:
                return await self._rerank(_parse(RerankRequest, body), Protocol.VLLM, REFUSE)
            except _Refused as e:
                return e.response(Protocol.VLLM)
        start = time.perf_counter()
        try:
            request = _parse(shapes.TeiRerankRequest, body)
            # TEI's --auto-truncate: what a request that does not say `truncate` gets.
            auto = LongItems(mode="truncate") if self.args.rerank.auto_truncate else REFUSE
            rerank = _internal(request.rerank)
            scores, _, _, _ = await self._rerank_scores(rerank, start, auto)
        except _Refused as e:
            return e.renamed(_named({"items": "texts", "documents": "texts"})).response(
                Protocol.TEI
            )
        ranks = shapes.tei_response(request, scores)
        return JSONResponse([r.model_dump(exclude_none=True) for r in ranks])

    @api.post(
        "/v1/rerank",
        response_model=RerankResponse,
        responses=errors.openapi_responses(Protocol.OURS),
    )
    async def rerank(self, body: RerankRequest) -> Any:
        """Documents sorted by relevance to the query (Cohere / Jina compatible): P(yes) of
        each document in the rerank prompt, all documents in one multi-item fan-out."""
        # Cohere v1's meaning of a document over the limit: its best window of up to 10.
        return await self._rerank(body, Protocol.OURS, COHERE_V1)

    async def _rerank(self, body: RerankRequest, protocol: Protocol, default: LongItems) -> Any:
        start = time.perf_counter()
        try:
            scores, tokens, headers, windows = await self._rerank_scores(body, start, default)
        except _Refused as e:
            return e.renamed(_named(body.renames())).response(protocol)
        usage = Usage(prompt_tokens=tokens, total_tokens=tokens)
        out = rerank_response(body, scores, body.model or self.model_name, usage, windows)
        return JSONResponse(out.model_dump(exclude_none=True), headers=headers)

    # ------------------------------------------------------------------ the one scoring path

    def _rerank_request(self, request: RerankRequest, default: LongItems) -> ScoreRequest:
        """The /v1/score request of a rerank: each document an item in the rerank prompt, one
        over the limit as the request says or else as `default` (the protocol's meaning)."""
        if self.rerank_labels is None:
            raise _Refused("query: reranking needs the model's tokenizer.json")
        long_items = request.long_items(default)
        relevant = 0  # the score column of relevance: P(yes), or the relevant class's
        kind, classes = self._head(request.model)
        labels = self.rerank_labels
        if kind == "classification":  # the class is read, no label token
            relevant, labels = self.args.rerank.class_index % len(classes), ()
        try:
            return self.rerank_prompt.score_request(request, labels, long_items, relevant)
        except ValidationError as e:  # what the documents make of the Score API's checks
            raise _Refused(validation_message(e)) from e

    def _relevance(self, scored: _Scored) -> tuple[list[list[float]], int, list[int] | None]:
        """(P(yes), P(no)) of each document of a rerank's answer, its prompt tokens, and the
        windows each document was scored as (when some were cut into windows)."""
        scores, tokens = scored.response["scores"], scored.response["usage"]["prompt_tokens"]
        if scored.head[0] == "classification":  # the relevant class's probability, the rest
            k = self.args.rerank.class_index
            scores = [[row[k], 1.0 - row[k]] for row in scores]
        return scores, tokens, scored.response.get("windows")

    async def _rerank_scores(
        self, request: RerankRequest, start: float, default: LongItems
    ) -> tuple[list[list[float]], int, dict[str, str], list[int] | None]:
        """(P(yes), P(no)) of each document in the rerank prompt, the prompt tokens, the
        X-MIS headers (chunks, replicas) and the windows per document (or None)."""
        scored = await self._score_one(self._rerank_request(request, default), "rerank", start)
        scores, tokens, windows = self._relevance(scored)
        return scores, tokens, scored.headers, windows

    async def _score_one(self, body: ScoreRequest, route: str, start: float) -> _Scored:
        """One score request, start to end; raises _Refused."""
        (answer,) = await self._run([self._prepare(body)], route, start)
        return _answered(answer)

    def _prepare(self, body: ScoreRequest) -> _Prepared:
        """The request's model name, token ids and limits checked (raises _Refused naming the
        field), and its items cut into chunks."""
        adapters = self.adapters
        if body.model is not None and body.model not in self.served_names + tuple(adapters):
            if body.model in self._checking:
                message = f"model: adapter {body.model!r} is being loaded"
                raise self._busy(message, ErrorKind.UNAVAILABLE)
            why = self._refused.get(body.model)
            raise _Refused(
                f"model: unknown model {body.model!r}"
                + (f" (its adapter was refused: {why})" if why else "")
                + f"; serving {list(self.served_names)}"
                + (f" and adapters {list(adapters)}" if adapters else ""),
                ErrorKind.NOT_FOUND,
            )
        try:
            query, items, windows = prepare_request(
                body,
                self.tokenizer,
                vocab_size=self.vocab_size,
                engine=self.args.engine,
                max_items=self.args.limits.max_items_per_request,
                head=(head := self._head(body.model)),
            )
        except ScoringInputError as e:
            raise _Refused(str(e)) from e
        fanout = self.args.fanout
        adapter = body.model if body.model in adapters else None
        chunks = make_chunks(body, query, items, fanout.chunk_items, fanout.chunk_tokens, adapter)
        return _Prepared(body, query, items, chunks, windows, head)

    def _head(self, model: str | None) -> tuple[str, tuple[str, ...]]:
        """The head scoring `model`'s requests: "lm" or "classification", and its classes."""
        return self.adapter_heads.get(model, self.head)  # type: ignore[arg-type]

    def _try_prepare(self, body: ScoreRequest) -> _Prepared | _Refused:
        try:
            return self._prepare(body)
        except _Refused as e:
            return e

    async def _run(
        self, jobs: list[_Prepared], route: str, start: float
    ) -> list[_Scored | _Refused]:
        """The jobs' chunks in one fan-out under the request's deadline; per job its answer,
        or the error that is its own. Raises _Refused when the request as a whole cannot be
        answered: no scorer ready, overloaded or failing (503), past the deadline (504)."""
        if not jobs:
            return []
        if not running_replicas(self._scorers):
            raise self._busy(
                "no scorer replica is ready yet (warming up, or being replaced)",
                ErrorKind.UNAVAILABLE,
            )
        timeout_s = self.args.limits.request_timeout_s
        fan_out = FanOut(self._call, [job.chunks for job in jobs])
        try:
            results = await fan_out.run(start + timeout_s)
        except asyncio.CancelledError:  # the client went away: nobody to answer
            log.info("%s: client disconnected; %d chunk calls cancelled", route, fan_out.calls)
            raise
        except DeadlineExceeded:
            n_items = sum(len(job.items) for job in jobs)
            log.warning(
                "%s: request of %d items timed out after %.1f s; %d chunk calls cancelled",
                route,
                n_items,
                timeout_s,
                fan_out.calls,
            )
            message = f"request timed out after request_timeout_s={timeout_s}"
            raise _Refused(message, ErrorKind.TIMEOUT) from None
        except ReplicaFailure as e:
            raise self._busy(str(e), e.kind) from e
        return [self._merge(job, r, route, start) for job, r in zip(jobs, results, strict=True)]

    def _merge(
        self, job: _Prepared, result: list[ChunkResult] | Exception, route: str, start: float
    ) -> _Scored | _Refused:
        """A job's chunk scores in item order as its /v1/score answer (counted in the
        metrics), or the refusal of its own failure."""
        match result:
            case ScoringInputError():
                return _Refused(str(cause(result)))
            case ChunkFailure():
                log.error("%s: a chunk failed on its own: %s", route, result)
                return _Refused(f"items: {result}", ErrorKind.FAILED)
            case Exception():
                raise result  # not a job's own failure: FanOut raises those
        columns = len(job.body.label_token_ids) or len(job.head[1])
        scores = merge_scores([r.scores for r in result], columns)
        replicas = sorted({r.replica for r in result})
        n_tokens = prompt_tokens(job.query, job.items)
        elapsed = time.perf_counter() - start
        log.info(
            "%s: %d items in %d chunks on %d replicas in %.1f ms",
            route,
            len(job.items),
            len(job.chunks),
            len(replicas),
            1e3 * elapsed,
        )
        m = metrics.ingress()
        m.request_latency.observe(elapsed, tags={"route": route})
        m.chunks.observe(len(job.chunks))
        if job.items:  # Ray counters refuse increments of 0
            m.items.inc(len(job.items), tags={"route": route})
            m.tokens.inc(n_tokens, tags={"route": route})
        headers = {"X-MIS-Replicas": ",".join(replicas), "X-MIS-Chunks": str(len(job.chunks))}
        model = job.body.model or self.model_name
        return _Scored(response_body(scores, model, n_tokens, job.windows), headers, job.head)

    def _busy(self, message: str, kind: ErrorKind) -> _Refused:
        retry = str(self.args.limits.retry_after_s)
        return _Refused(f"{message}; retry later", kind, {"Retry-After": retry})

    @api.get(
        "/health",
        responses={503: {"description": "Not ready: no scorer replica can take a chunk now"}},
    )
    async def health(self) -> JSONResponse:
        """Readiness: 200 while at least one scorer replica can take a chunk, else 503 with
        Retry-After (starting up, or every replica failed). Liveness: /livez."""
        ready = running_replicas(self._scorers) or 0
        body = {
            "status": "ready" if ready else "not ready",
            "scorer_replicas_ready": ready,
            "model": self.model_name,
            "deployment": self.deployment,
        }
        if ready:
            return JSONResponse(body)
        return JSONResponse(body, 503, {"Retry-After": str(self.args.limits.retry_after_s)})

    @api.get("/livez")
    async def live(self) -> dict[str, str]:
        """Liveness: 200 while this ingress process answers (for a probe that restarts it)."""
        return {"status": "alive"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The served model, once per name it answers to (model.name, model.served_names),
        and each LoRA adapter (its `parent` the base; its own head's classes where it has one)."""

        def card(model: str | None) -> dict[str, Any]:
            head, classes = self._head(model)
            return {
                "object": "model",
                "owned_by": "mis-serve",
                "random_weights": self.random_weights,
                # "lm": scores at label_token_ids; "classification": every class, no labels.
                "head": head,
                **({"class_labels": list(classes)} if classes else {}),
                # What one request may hold (clients split longer item lists by it).
                "limits": {
                    "max_items_per_request": self.args.limits.max_items_per_request,
                    "max_body_bytes": self.args.limits.max_body_bytes,
                    **self.args.engine.limits,
                },
            }

        base = [{"id": name, "root": self.model_name, **card(None)} for name in self.served_names]
        adapters = [
            {"id": name, "root": path, "parent": self.model_name, "adapter": "lora", **card(name)}
            for name, path in self.adapters.items()
        ]
        refused = {"refused": dict(self._refused)} if self._refused else {}
        error = {"user_config_error": self._config_error} if self._config_error else {}
        return {"object": "list", "data": base + adapters, **refused, **error}
