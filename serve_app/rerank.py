"""`POST /v1/rerank` (Cohere / Jina compatible) on top of multi-item scoring.

A rerank call is one `/v1/score` call: the prompt up to the document is the shared query, each
document (in its template) is an item, and the relevance score is P(yes) under a softmax over
the two label tokens ("yes", "no") at the item's last token. So 1,000 documents are one fan-out
of chunks, not 1,000 forwards. The default prompt is Qwen3-Reranker's format. Pure pydantic.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from mis_api.schema import ScoreRequest, Usage

# Qwen3-Reranker's prompt (its model card): system turn, user turn with instruction, query and
# document, and an assistant turn with an empty think block; the answer is "yes" or "no".
QWEN3_RERANKER_QUERY = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
)
# The space before the document stays with it, as in the model card's joint tokenization.
QWEN3_RERANKER_DOCUMENT = " {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANKER_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr


class RerankRequest(BaseModel):
    """A query and the documents to rank (strings or `{"text": ...}`)."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(description="The search query.")
    documents: list[StrictStr | RerankDocument] = Field(description="Documents to rank.")
    top_n: StrictInt | None = Field(
        default=None, ge=1, description="Return the best n (default: all)."
    )
    return_documents: StrictBool = Field(
        default=False, description="Include each document's text in its result."
    )
    model: StrictStr | None = Field(default=None, description="Served model name (optional).")

    @model_validator(mode="after")
    def _check(self) -> RerankRequest:
        if not self.query:
            raise ValueError("query: must not be empty")
        return self

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="P(yes) under a softmax over (yes, no).")
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    object: Literal["rerank"] = "rerank"
    results: list[RerankResult] = Field(description="Sorted by relevance_score, best first.")
    usage: Usage


@dataclasses.dataclass(frozen=True)
class RerankPrompt:
    """How a (query, document) pair becomes `query piece ++ document piece` token text."""

    query_template: str  # {instruction}, {query}
    document_template: str  # {document}
    instruction: str  # the defaults: serve_app.config.RerankArgs

    def __post_init__(self) -> None:
        if "{query}" not in self.query_template:
            raise ValueError("rerank_query_template: must contain {query}")
        if "{document}" not in self.document_template:
            raise ValueError("rerank_document_template: must contain {document}")

    def score_request(self, req: RerankRequest, label_ids: tuple[int, int]) -> ScoreRequest:
        """The `/v1/score` request whose first score per item is the relevance score."""
        # Plain substitution, not str.format: templates may hold other braces.
        query = self.query_template.replace("{instruction}", self.instruction)
        return ScoreRequest(
            query=query.replace("{query}", req.query),
            items=[self.document_template.replace("{document}", t) for t in req.texts()],
            label_token_ids=list(label_ids),
            apply_softmax=True,
            model=req.model,
        )


def label_ids(encode, labels: Sequence[str]) -> tuple[int, int]:
    """Token ids of the (relevant, irrelevant) labels; each must be exactly one token."""
    ids = []
    for label in labels:
        tokens = encode(label)
        if len(tokens) != 1:
            raise ValueError(f"rerank_labels: {label!r} is {len(tokens)} tokens, not one")
        ids.append(tokens[0])
    if len(ids) != 2 or ids[0] == ids[1]:
        raise ValueError(f"rerank_labels: need two different labels, got {list(labels)}")
    return ids[0], ids[1]


def best_first(scores: Sequence[Sequence[float]]) -> list[int]:
    """Indices by relevance (each item's first score), best first; ties keep request order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i][0])


def rerank_response(
    req: RerankRequest, scores: Sequence[Sequence[float]], model: str, usage: Usage
) -> RerankResponse:
    """Results sorted by relevance (ties keep request order), cut to `top_n`."""
    order = best_first(scores)
    texts = req.texts()
    results = [
        RerankResult(
            index=i,
            relevance_score=scores[i][0],
            document=RerankDocument(text=texts[i]) if req.return_documents else None,
        )
        for i in order[: req.top_n]
    ]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}", model=model, results=results, usage=usage
    )
