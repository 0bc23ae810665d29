"""Python client for a mis-serve deployment: plain HTTP, no JAX and no Ray.

    from mis_score.client import Client
    client = Client("http://127.0.0.1:8000", api_key=None, timeout=300)
    scores = client.score("Is it light?", ["1 kg", "3 kg"], [9454, 2753], apply_softmax=True)
    # numpy array [items, labels], item order
    ranked = client.rerank("light laptops", ["1 kg ultrabook", "3 kg gaming laptop"], top_n=1)
    per_query = client.score_batch([{"query": q, "items": items, "label_token_ids": [9454]}
                                    for q, items in candidates.items()])

`AsyncClient` has the same methods as coroutines. Both read the deployment's limits from
`/v1/models` once and split an item list longer than `max_items_per_request` into several
requests, whose scores are merged in item order (the service scores each item exactly as if
alone, so a split changes no bit of any score). A 503 (overloaded, or no scorer ready yet) is
retried after the server's Retry-After, and a failed connection after a growing backoff, both
bounded by `max_retries`; a 4xx is never retried. Errors carry the server's message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

Items = str | Sequence[str] | Sequence[Sequence[int]]  # a string: one item


class MisServeError(Exception):
    """An error answer: `status` (HTTP), `type` and `message` from the server's error body."""

    def __init__(self, status: int, message: str, type: str = "", body: Any = None):
        super().__init__(f"{status} {type}: {message}" if type else f"{status}: {message}")
        self.status, self.message, self.type, self.body = status, message, type, body


class BadRequestError(MisServeError):
    """A 4xx: the request itself is wrong (the message names the field); not retried."""


class UnavailableError(MisServeError):
    """A 503 that stayed one through every retry (overloaded, or no scorer ready)."""


class ServerError(MisServeError):
    """Any other 5xx (a chunk that failed, a deadline)."""


def _error(status: int, body: Any) -> MisServeError:
    if isinstance(body, dict):
        message, kind = str(body.get("message", body)), str(body.get("type", ""))
    else:
        message, kind = str(body), ""
    cls = BadRequestError if status < 500 else UnavailableError if status == 503 else ServerError
    return cls(status, message, kind, body)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold, as the deployment reports it (`/v1/models`)."""

    max_items_per_request: int
    max_query_tokens: int
    max_item_tokens: int
    max_labels: int
    max_body_bytes: int

    @classmethod
    def from_models(cls, models: dict[str, Any]) -> Limits:
        limits = models["data"][0]["limits"]
        return cls(**{f.name: int(limits[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class _Retry:
    """When to try a request again: a 503 after its Retry-After (else the backoff), a failed
    connection after the backoff (doubling up to `max_backoff_s`), at most `max_retries`
    times."""

    max_retries: int
    backoff_s: float
    max_backoff_s: float

    def delay(self, attempt: int, retry_after: str | None) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None: give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None and retry_after.strip().isdigit():
            return float(retry_after)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt)


def _score_body(
    query: str | Sequence[int],
    items: Items,
    label_token_ids: Sequence[int] | None,
    apply_softmax: bool,
    item_first: bool,
    model: str | None,
    **options: Any,
) -> dict[str, Any]:
    """The /v1/score body; `options`: the Score API's other fields (long_items, item_prefix,
    item_suffix), sent when not None."""
    if isinstance(items, str):  # one item, as the server reads a string (not its characters)
        items = [items]
    body: dict[str, Any] = {
        "query": query if isinstance(query, str) else list(query),
        "items": [it if isinstance(it, str) else list(it) for it in items],
        "apply_softmax": apply_softmax,
        "item_first": item_first,
    }
    if label_token_ids is not None:
        body["label_token_ids"] = list(label_token_ids)
    if model is not None:
        body["model"] = model
    return body | {k: v for k, v in options.items() if v is not None}


def _ids(frame: str | Sequence[int] | None) -> str | list[int] | None:
    return frame if frame is None or isinstance(frame, str) else list(frame)


def _parts(n_items: int, limit: int) -> list[slice]:
    """Slices of at most `limit` items (one, empty, for no items: the server says why)."""
    return [slice(i, i + limit) for i in range(0, n_items, limit)] or [slice(0, 0)]


def _merge(answers: list[dict[str, Any]]) -> np.ndarray:
    rows = [row for a in answers for row in a["scores"]]
    return np.asarray(rows, dtype=np.float64)


def _batch_results(answer: dict[str, Any]) -> list[np.ndarray | MisServeError]:
    """Per entry of a /v1/score/batch answer: its scores, or its error (not raised)."""
    return [
        _error(int(r.get("code", 400)), r)
        if r.get("object") == "error"
        else np.asarray(r["scores"], dtype=np.float64)
        for r in answer["responses"]
    ]


def _rerank_body(
    query: str,
    documents: Sequence[str],
    top_n: int | None,
    return_documents: bool,
    model: str | None,
    **options: Any,
) -> dict[str, Any]:
    """The /v1/rerank body; `options`: its other fields (long_documents, instruction), sent
    when not None."""
    body: dict[str, Any] = {
        "query": query,
        "documents": list(documents),
        "return_documents": return_documents,
    }
    if top_n is not None:
        body["top_n"] = top_n
    if model is not None:
        body["model"] = model
    return body | {k: v for k, v in options.items() if v is not None}


class _Base:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 300.0,
        *,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        deployment: str | None = None,
    ):
        """`url`: the deployment's base URL. `deployment`: its X-MIS-Deployment (from
        `/health`): a request that reaches another deployment is then refused (421)."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = _Retry(max_retries, backoff_s, max_backoff_s)
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        if deployment:
            self.headers["x-mis-deployment"] = deployment
        self._limits: Limits | None = None
        self.retries = 0  # requests sent again (503, or a failed connection) so far


class Client(_Base):
    """Blocking client (one `requests.Session`, reused connections)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, **kw: Any):
        super().__init__(url, api_key, timeout, **kw)
        import requests

        self._requests = requests
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        attempt = 0
        while True:
            retry_after = None
            try:
                r = self._session.request(
                    method, self.url + path, json=body, headers=self.headers, timeout=self.timeout
                )
            except self._requests.ConnectionError as e:
                failure: Exception = e
            else:
                if r.status_code < 400:
                    return r.json()
                try:
                    payload = r.json()
                except ValueError:
                    payload = r.text
                failure = _error(r.status_code, payload)
                if r.status_code != 503:
                    raise failure
                retry_after = r.headers.get("retry-after")
            delay = self.retry.delay(attempt, retry_after)
            if delay is None:
                raise failure
            time.sleep(delay)
            attempt += 1
            self.retries += 1

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/v1/models")

    def health(self) -> dict[str, Any]:
        """Readiness (`/health`); raises UnavailableError while no scorer is ready."""
        return self._call("GET", "/health")

    def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_models(self.models())
        return self._limits

    def score(
        self,
        query: str | Sequence[int],
        items: Items,
        label_token_ids: Sequence[int] | None = None,
        *,
        apply_softmax: bool = False,
        item_first: bool = False,
        model: str | None = None,
        long_items: dict[str, Any] | None = None,
        item_prefix: str | Sequence[int] | None = None,
        item_suffix: str | Sequence[int] | None = None,
    ) -> np.ndarray:
        """Scores [items, labels] in item order (`/v1/score`); longer item lists than the
        deployment takes in one request are sent as several. `model`: the base's name or a
        LoRA adapter's; `long_items`, `item_prefix`, `item_suffix`: the Score API's (README:
        Long documents)."""
        body = _score_body(
            query, items, label_token_ids, apply_softmax, item_first, model,
            long_items=long_items, item_prefix=_ids(item_prefix), item_suffix=_ids(item_suffix),
        )  # fmt: skip
        parts = _parts(len(body["items"]), self.limits().max_items_per_request)
        answers = [
            self._call("POST", "/v1/score", body | {"items": body["items"][p]}) for p in parts
        ]
        return _merge(answers)

    def score_batch(self, requests: Sequence[dict[str, Any]]) -> list[np.ndarray | MisServeError]:
        """Several Score API requests (the /v1/score body, e.g. one per query) in one call
        (`/v1/score/batch`): per entry its scores, or the error the server gave that entry
        alone (returned, not raised: the other entries are still answered). What the server
        answers for the batch as a whole is handled as for `score`: a 503 (no scorer ready,
        overloaded) retried after its Retry-After, any other error raised."""
        return _batch_results(self._call("POST", "/v1/score/batch", {"requests": list(requests)}))

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        model: str | None = None,
        long_documents: dict[str, Any] | None = None,
        instruction: str | None = None,
    ) -> list[dict[str, Any]]:
        """`/v1/rerank`'s results: {index, relevance_score[, document]}, best first (a
        document cut into windows is scored as its best unless `long_documents` says
        otherwise; README: Long documents)."""
        body = _rerank_body(
            query, documents, top_n, return_documents, model,
            long_documents=long_documents, instruction=instruction,
        )  # fmt: skip
        return self._call("POST", "/v1/rerank", body)["results"]


class AsyncClient(_Base):
    """The same methods as coroutines (aiohttp); the parts of a split request run at once."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, **kw: Any):
        super().__init__(url, api_key, timeout, **kw)
        self._session: Any = None

    async def _open(self) -> Any:
        if self._session is None:
            import aiohttp

            self._aiohttp = aiohttp
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        session = await self._open()
        attempt = 0
        while True:
            retry_after = None
            try:
                async with session.request(
                    method, self.url + path, json=body, headers=self.headers
                ) as r:
                    if r.status < 400:
                        return await r.json()
                    try:
                        payload = await r.json(content_type=None)
                    except ValueError:
                        payload = await r.text()
                    failure: Exception = _error(r.status, payload)
                    if r.status != 503:
                        raise failure
                    retry_after = r.headers.get("retry-after")
            except self._aiohttp.ClientConnectionError as e:
                failure = e
            delay = self.retry.delay(attempt, retry_after)
            if delay is None:
                raise failure
            await asyncio.sleep(delay)
            attempt += 1
            self.retries += 1

    async def models(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/models")

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/health")

    async def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_models(await self.models())
        return self._limits

    async def score(
        self,
        query: str | Sequence[int],
        items: Items,
        label_token_ids: Sequence[int] | None = None,
        *,
        apply_softmax: bool = False,
        item_first: bool = False,
        model: str | None = None,
        long_items: dict[str, Any] | None = None,
        item_prefix: str | Sequence[int] | None = None,
        item_suffix: str | Sequence[int] | None = None,
    ) -> np.ndarray:
        body = _score_body(
            query, items, label_token_ids, apply_softmax, item_first, model,
            long_items=long_items, item_prefix=_ids(item_prefix), item_suffix=_ids(item_suffix),
        )  # fmt: skip
        parts = _parts(len(body["items"]), (await self.limits()).max_items_per_request)
        answers = await asyncio.gather(
            *(self._call("POST", "/v1/score", body | {"items": body["items"][p]}) for p in parts)
        )
        return _merge(list(answers))

    async def score_batch(
        self, requests: Sequence[dict[str, Any]]
    ) -> list[np.ndarray | MisServeError]:
        answer = await self._call("POST", "/v1/score/batch", {"requests": list(requests)})
        return _batch_results(answer)

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        model: str | None = None,
        long_documents: dict[str, Any] | None = None,
        instruction: str | None = None,
    ) -> list[dict[str, Any]]:
        body = _rerank_body(
            query, documents, top_n, return_documents, model,
            long_documents=long_documents, instruction=instruction,
        )  # fmt: skip
        return (await self._call("POST", "/v1/rerank", body))["results"]
