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

from mis_api.long_items import MAX_WINDOWS, REFUSE, LongItems
from mis_api.schema import ScoreRequest, Usage

# Cohere v1's max_chunks_per_doc default: a long document is scored as its best of this many.
COHERE_V1_CHUNKS = 10
COHERE_V1 = LongItems(mode="chunk", max_chunks=COHERE_V1_CHUNKS)
# Documents whose prompts check a template's split (RerankPrompt.split_differs).
PROBES = ("Ultrabook, 1.1 kg.", "a", "ends with a space ", "two\nlines\n", "数字 42", "<b>x</b>")

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
    instruction: StrictStr | None = Field(
        default=None,
        description="The task instruction in the prompt for this request, in place of the "
        "server's rerank.instruction (vLLM's name).",
    )
    instruct: StrictStr | None = Field(default=None, description="SGLang's name of instruction.")
    max_chunks_per_doc: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_WINDOWS,
        description="Cohere v1: a document over the limit is cut into windows of the limit, at "
        f"most this many (default {COHERE_V1_CHUNKS}), and scored as its best window.",
    )
    truncate_prompt_tokens: StrictInt | None = Field(
        default=None,
        ge=-1,
        description="vLLM: the prompt (instruction, query, document, template) cut to this many "
        "tokens by cutting the document's end; -1: to the server's limit.",
    )
    long_documents: LongItems | None = Field(
        default=None,
        description="What happens to a document over the limit (the Score API's long_items), "
        "in place of the options above.",
    )

    @model_validator(mode="after")
    def _check(self) -> RerankRequest:
        if not self.query:
            raise ValueError("query: must not be empty")
        if self.instruction is not None and self.instruct is not None:
            raise ValueError("instruct: give instruction or instruct, not both")
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens: must be -1 or at least 1")
        given = [
            name
            for name in ("max_chunks_per_doc", "truncate_prompt_tokens", "long_documents")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one of {given}, not both")
        return self

    def long_items(self, default: LongItems) -> LongItems:
        """What happens to this request's documents over the limit: its own option, else
        `default` (the protocol's meaning)."""
        if self.long_documents is not None:
            return self.long_documents
        if self.max_chunks_per_doc is not None:
            return LongItems(mode="chunk", max_chunks=self.max_chunks_per_doc)
        if self.truncate_prompt_tokens is not None:
            k = self.truncate_prompt_tokens
            return LongItems(mode="truncate", max_prompt_tokens=None if k == -1 else k)
        return default

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def renames(self) -> dict[str, str]:
        """The Score API's field names in an error -> this request's own."""
        names = {"items": "documents"}
        if self.truncate_prompt_tokens is not None:
            names["long_items.max_prompt_tokens"] = "truncate_prompt_tokens"
        if self.max_chunks_per_doc is not None:
            names["long_items.max_chunks"] = "max_chunks_per_doc"
        elif self.long_documents is None:  # /v1/rerank's default windows: the client sent none
            names["long_items.max_chunks"] = (
                f"max_chunks_per_doc (default {COHERE_V1_CHUNKS}) or long_documents.max_chunks"
            )
        names["long_items"] = "long_documents"
        return names


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="P(yes) under a softmax over (yes, no).")
    document: RerankDocument | None = None
    windows: int | None = Field(
        default=None,
        description="The windows the document was scored as, when some document of the "
        "request was cut into windows (its score: their best, or as long_documents.pool says).",
    )


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

    def score_request(
        self,
        req: RerankRequest,
        label_ids: tuple[int, ...],
        long_items: LongItems = REFUSE,
        relevant: int = 0,
    ) -> ScoreRequest:
        """The `/v1/score` request whose score column `relevant` per item is the relevance
        score. The document template's parts around `{document}` frame every item (and every
        piece of a cut one): its end is the items' suffix and what comes before is their prefix
        but for its trailing whitespace, which stays with the document (tokenized as in the whole
        prompt); Qwen3-Reranker's model card tokenizes the same parts apart."""
        # Plain substitution, not str.format: templates may hold other braces.
        instruction = req.instruction or req.instruct or self.instruction
        query = self.query_template.replace("{instruction}", instruction)
        head, lead, after = self.frame()
        return ScoreRequest(
            query=query.replace("{query}", req.query),
            items=[lead + t for t in req.texts()],
            item_prefix=head or None,
            item_suffix=after or None,
            label_token_ids=list(label_ids),
            apply_softmax=True,
            model=req.model,
            long_items=long_items.model_copy(update={"pool_column": relevant}),
        )

    def frame(self) -> tuple[str, str, str]:
        """(prefix, the whitespace that leads the document, suffix) of the document template."""
        before, after = self.document_template.split("{document}", 1)
        head = before.rstrip()
        return head, before[len(head) :], after

    def split_differs(self, encode, probes: Sequence[str] = PROBES) -> str | None:
        """A probe document whose prompt tokenized in parts (prefix, document, suffix) is not
        its whole prompt's tokens, or None: the parts are tokenized apart so a cut never
        touches the frame, which for most templates changes no token."""
        head, lead, after = self.frame()
        for probe in probes:
            whole = encode(self.document_template.replace("{document}", probe))
            parts = (encode(head) if head else []) + encode(lead + probe)
            if parts + (encode(after) if after else []) != whole:
                return probe
        return None


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
    req: RerankRequest,
    scores: Sequence[Sequence[float]],
    model: str,
    usage: Usage,
    windows: Sequence[int] | None = None,
) -> RerankResponse:
    """Results sorted by relevance (ties keep request order), cut to `top_n`."""
    order = best_first(scores)
    texts = req.texts()
    results = [
        RerankResult(
            index=i,
            relevance_score=scores[i][0],
            document=RerankDocument(text=texts[i]) if req.return_documents else None,
            windows=None if windows is None else windows[i],
        )
        for i in order[: req.top_n]
    ]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}", model=model, results=results, usage=usage
    )
