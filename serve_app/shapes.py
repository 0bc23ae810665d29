"""Other clients' request shapes, each a thin adapter onto the one scoring path: a pydantic model
per request and response, a function from the request to the internal rerank request(s), and
one from the scores back to the response. Pure pydantic.

    Cohere v2 rerank      POST /v2/rerank           -> one rerank (documents as items)
    vLLM / Jina rerank    POST /rerank (documents)  -> /v1/rerank's own shape
    TEI rerank            POST /rerank (texts)      -> one rerank; [{index, score, text?}]
    vLLM score            POST /score, /v1/score (text_1/text_2 or queries/documents)
                                                    -> one rerank per distinct query text
    batch of Score API    POST /v1/score/batch      -> one /v1/score per entry, fanned out together

A vLLM or TEI score is what `/v1/rerank` gives the same pair: P(yes) in the rerank prompt.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from mis_api.long_items import LongItems
from mis_api.schema import Usage
from serve_app.rerank import RerankRequest, best_first

# Cohere v2's max_tokens_per_doc default (docs.cohere.com/reference/rerank).
COHERE_V2_MAX_TOKENS = 4096


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- Cohere v2


class CohereV2RerankRequest(_Shape):
    """Cohere's v2 rerank request, as `cohere.ClientV2.rerank` sends it."""

    model: StrictStr = Field(description="Served model name (one of /v1/models).")
    query: StrictStr
    documents: list[StrictStr]
    top_n: StrictInt | None = Field(default=None, ge=1)
    max_tokens_per_doc: StrictInt | None = Field(
        default=None,
        ge=1,
        description=f"A document's tokens kept (its end cut), default {COHERE_V2_MAX_TOKENS} as "
        "Cohere's; at most the server's limit (engine.max_item_tokens less the template).",
    )
    priority: StrictInt | None = Field(default=None, description="Accepted and ignored.")

    def rerank(self) -> RerankRequest:
        cut = LongItems(mode="truncate", max_tokens=self.max_tokens_per_doc or COHERE_V2_MAX_TOKENS)
        return RerankRequest(
            query=self.query,
            documents=list(self.documents),
            top_n=self.top_n,
            model=self.model,
            long_documents=cut,
        )


class CohereError(BaseModel):
    """Cohere's error body (docs.cohere.com/reference/errors): the SDK raises it as the body of
    BadRequestError (400), NotFoundError (404), TooManyRequestsError (429),
    ServiceUnavailableError (503), GatewayTimeoutError (504), ... by status."""

    message: str


class CohereV2Result(BaseModel):
    index: int
    relevance_score: float


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2Result] = Field(description="Best first, cut to top_n.")
    meta: dict[str, Any]


def cohere_v2_response(
    req: CohereV2RerankRequest, scores: Sequence[Sequence[float]], usage: Usage
) -> CohereV2RerankResponse:
    order = best_first(scores)[: req.top_n]
    return CohereV2RerankResponse(
        id=str(uuid.uuid4()),
        results=[CohereV2Result(index=i, relevance_score=scores[i][0]) for i in order],
        meta={
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": usage.prompt_tokens, "output_tokens": 0},
        },
    )


# ----------------------------------------------------------------------------- TEI


class TeiRerankRequest(_Shape):
    """Text Embeddings Inference's `/rerank` request."""

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = Field(
        default=False, description="true: the logit log(P(yes) / P(no)) instead of P(yes)."
    )
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(
        default=None,
        description="true: a text over the limit has its tokens cut (the template's never); "
        "false: it is refused (413). Not given: the server's rerank.auto_truncate.",
    )
    truncation_direction: Literal["Left", "Right", "left", "right"] = Field(
        default="Right", description="Right cuts the end (keeps the start), Left the start."
    )

    def rerank(self) -> RerankRequest:
        cut = None
        if self.truncate is not None:
            side = "right" if self.truncation_direction.lower() == "right" else "left"
            cut = LongItems(mode="truncate", side=side) if self.truncate else LongItems()
        return RerankRequest(query=self.query, documents=list(self.texts), long_documents=cut)


TeiErrorType = Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


class TeiError(BaseModel):
    """TEI's ErrorResponse (router/src/lib.rs): `error_type` serialized as its variant name,
    the status by type (router/src/http/server.rs): Validation 413, Tokenizer 422, Empty 400,
    Overloaded 429, Backend 424, Unhealthy 503."""

    error: str
    error_type: TeiErrorType


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


def tei_response(req: TeiRerankRequest, scores: Sequence[Sequence[float]]) -> list[TeiRank]:
    """Best first, as TEI sorts them."""
    out = []
    for i in best_first(scores):
        yes, no = scores[i][0], scores[i][1]
        score = _logit(yes, no) if req.raw_scores else yes
        out.append(TeiRank(index=i, score=score, text=req.texts[i] if req.return_text else None))
    return out


def _logit(yes: float, no: float) -> float:
    """log(P(yes) / P(no)): the rerank's raw score (its sigmoid is P(yes))."""
    if no <= 0.0:
        return math.inf
    if yes <= 0.0:
        return -math.inf
    return math.log(yes) - math.log(no)


# ----------------------------------------------------------------------------- vLLM score


class VllmScoreRequest(_Shape):
    """vLLM's score request: `text_1`/`text_2` (1:1, 1:N, N:N) or `queries`/`documents`."""

    model: StrictStr | None = None
    text_1: StrictStr | list[StrictStr] | None = None
    text_2: StrictStr | list[StrictStr] | None = None
    queries: StrictStr | list[StrictStr] | None = None
    documents: StrictStr | list[StrictStr] | None = None
    truncate_prompt_tokens: StrictInt | None = Field(
        default=None,
        ge=-1,
        description="The prompt (instruction, query, document, template) cut to this many tokens "
        "by cutting the document's end; -1: to the server's limit. Not given: a document over "
        "the limit is refused (400).",
    )
    encoding_format: StrictStr | None = None
    priority: StrictInt | None = None
    user: StrictStr | None = None

    @model_validator(mode="after")
    def _check(self) -> VllmScoreRequest:
        if (self.text_1 is None) == (self.queries is None):
            raise ValueError("text_1: give text_1 and text_2, or queries and documents")
        first, second = self.field_names()
        if self._second is None:
            raise ValueError(f"{second}: missing (give it with {first})")
        firsts, seconds = _texts(self._first), _texts(self._second)
        if not firsts:
            raise ValueError(f"{first}: must not be empty")
        for i, text in enumerate(firsts):
            if not text:
                name = first if isinstance(self._first, str) else f"{first}[{i}]"
                raise ValueError(f"{name}: must not be empty")
        if len(firsts) > 1 and len(firsts) != len(seconds):
            raise ValueError(
                f"{first}: {len(firsts)} texts for {len(seconds)} in {second}; give one, or "
                f"as many as {second} (pairs)"
            )
        return self

    @property
    def _first(self) -> str | list[str] | None:
        return self.text_1 if self.text_1 is not None else self.queries

    @property
    def _second(self) -> str | list[str] | None:
        return self.text_2 if self.text_1 is not None else self.documents

    def field_names(self) -> tuple[str, str]:
        """The request's own names of (its queries, its documents)."""
        return ("text_1", "text_2") if self.text_1 is not None else ("queries", "documents")

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) per score, in order: 1:N pairs the one query with each."""
        firsts, seconds = _texts(self._first), _texts(self._second)
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        return list(zip(firsts, seconds, strict=True))

    def reranks(self) -> tuple[list[RerankRequest], list[tuple[int, int]]]:
        """One rerank per distinct query text (its documents in pair order), and for each pair
        (which rerank, which document of it)."""
        by_query: dict[str, list[str]] = {}
        where = []
        for query, document in self.pairs():
            docs = by_query.setdefault(query, [])
            where.append((list(by_query).index(query), len(docs)))
            docs.append(document)
        reranks = [
            RerankRequest(
                query=q,
                documents=list(docs),
                model=self.model,
                truncate_prompt_tokens=self.truncate_prompt_tokens,
            )
            for q, docs in by_query.items()
        ]
        return reranks, where

    def name_fields(self, message: str, group: int) -> str:
        """An error message about rerank `group` (of `reranks()`), its fields named as this
        request names them: a document by its index in text_2 / documents, not in its group."""
        first, second = self.field_names()
        where = self.reranks()[1]
        if m := _ITEM.match(message):
            pair = where.index((group, int(m[1])))
            name = second if isinstance(self._second, str) else f"{second}[{pair}]"
            return name + message[m.end() :]
        if message.startswith("query"):  # the group's query: named where it first appears
            pair = [r for r, _ in where].index(group)
            name = first if isinstance(self._first, str) else f"{first}[{pair}]"
            return name + message[len("query") :]
        for ours in ("items", "documents"):
            if message.startswith(ours):
                return second + message[len(ours) :]
        if message.startswith(ours := "long_items.max_prompt_tokens"):
            return "truncate_prompt_tokens" + message[len(ours) :]
        return message


_ITEM = re.compile(r"items\[(\d+)\]")


def _texts(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class VllmErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None  # the field the message is about
    code: int  # the HTTP status


class VllmError(BaseModel):
    """vLLM's ErrorResponse (vllm/entrypoints/serve/engine/protocol.py): the error nested
    under `error`, its `code` the HTTP status."""

    error: VllmErrorInfo


class VllmScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class VllmScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[VllmScoreData]
    usage: dict[str, int]


def vllm_response(scores: Sequence[float], model: str, prompt_tokens: int) -> VllmScoreResponse:
    return VllmScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        data=[VllmScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage={"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    )


def is_vllm_score(body: Any) -> bool:
    """A `/v1/score` body in vLLM's shape rather than SGLang's (told apart by its fields)."""
    return isinstance(body, dict) and bool({"text_1", "text_2", "queries", "documents"} & set(body))


# ----------------------------------------------------------------------------- batch


class BatchScoreRequest(_Shape):
    """Several Score API requests in one body; each entry is checked on its own, so one bad
    entry fails only itself."""

    requests: list[dict[str, Any]] = Field(
        description="Score API requests (the /v1/score body), answered in the same order."
    )


class BatchScoreResponse(BaseModel):
    object: Literal["batch"] = "batch"
    responses: list[dict[str, Any]] = Field(
        description="Per entry: its /v1/score response, or its error body."
    )
