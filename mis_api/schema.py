"""The `/v1/score` request and response bodies (SGLang-compatible), shared by the HTTP service
and the offline CLI. Pure pydantic: importing this module does not import Ray."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from mis_api.long_items import REFUSE, LongItems

TokenIds = list[StrictInt]


class ScoreRequest(BaseModel):
    """One query and its candidate items; scores come back in item order."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr | TokenIds = Field(description="Query text, or its token ids.")
    items: StrictStr | list[StrictStr] | list[TokenIds] = Field(
        description="Candidate items: text, list of texts, or list of token-id lists "
        "(the same kind as `query`)."
    )
    label_token_ids: list[StrictInt] = Field(
        default=[],
        description="Token ids whose next-token probability is returned for each item "
        "(required for a causal LM; none for a classification model, whose classes are "
        "fixed: see /v1/models).",
    )
    apply_softmax: StrictBool = Field(
        default=False,
        description="true: softmax over the label logits only (a classification model: over "
        "its classes, sigmoid for one class); false: full-vocab probabilities (a "
        "classification model: the raw class logits).",
    )
    item_first: StrictBool = Field(
        default=False, description="Score `item ++ query` instead of `query ++ item`."
    )
    model: StrictStr | None = Field(default=None, description="Served model name (optional).")
    item_prefix: StrictStr | TokenIds | None = Field(
        default=None,
        description="Put before every item, and before every piece of a cut one (text or "
        "token ids, as the items): a prompt template's part before the document, never cut. "
        "Counts toward max_item_tokens.",
    )
    item_suffix: StrictStr | TokenIds | None = Field(
        default=None,
        description="Put after every item, and after every piece of a cut one: a prompt "
        "template's end (the scores are read at its last token), never cut. Counts toward "
        "max_item_tokens.",
    )
    long_items: LongItems = Field(
        default=REFUSE,
        description="What happens to an item over max_item_tokens (or over long_items' own "
        "limits): refused (400, the default), truncated, or cut into windows whose scores are "
        "pooled.",
    )

    @model_validator(mode="after")
    def _check(self) -> ScoreRequest:
        if isinstance(self.items, str):
            self.items = [self.items]
        text_query = isinstance(self.query, str)
        if not self.query:
            raise ValueError("query: must not be empty")
        for i, item in enumerate(self.items):
            if isinstance(item, str) != text_query:
                raise ValueError(
                    f"items[{i}]: query and items must both be text or both be token ids"
                )
            if len(item) == 0 and not (self.item_prefix or self.item_suffix):
                raise ValueError(f"items[{i}]: must not be empty")  # framed, it is not
        if len(set(self.label_token_ids)) != len(self.label_token_ids):
            raise ValueError("label_token_ids: must not contain duplicates")
        for name in ("item_prefix", "item_suffix"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) != text_query:
                raise ValueError(f"{name}: must be text with text items, token ids with ids")
            if self.item_first:
                raise ValueError(f"{name}: not with item_first (it frames an item in front)")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    scores: list[list[float]]
    model: str
    object: Literal["scoring"] = "scoring"
    usage: Usage
    windows: list[int] | None = Field(
        default=None,
        description="long_items.mode chunk, when an item was cut: the windows each item was "
        "scored as (its scores pooled over them).",
    )


class ErrorBody(BaseModel):
    """Every error response: the message starts with the offending field."""

    object: Literal["error"] = "error"
    message: str
    type: str
    code: int


def error_body(message: str, code: int, type_: str = "BadRequestError") -> dict[str, Any]:
    """The error body every endpoint and the CLI return: names the offending field."""
    return {"object": "error", "message": message, "type": type_, "code": code}


def validation_message(err: ValidationError) -> str:
    """One line per problem, each starting with the field path (e.g. `items.3: ...`)."""
    return format_errors(err.errors())


def format_errors(errors: Sequence[Any]) -> str:
    """pydantic / FastAPI error dicts -> `field: message; field: message`."""
    lines = []
    for e in errors:
        if e.get("type") == "json_invalid":
            lines.append(f"body: invalid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
            continue
        parts = list(e["loc"])
        if parts[:1] == ["body"] and len(parts) > 1:  # FastAPI's prefix for body fields
            parts = parts[1:]
        loc = ".".join(str(p) for p in parts if not _is_union_tag(p))
        msg = e["msg"].removeprefix("Value error, ")
        if _NAMES_FIELD.match(msg):  # a model's own check, naming its field
            loc = "" if parts in ([], ["body"]) else loc
            msg = f"{loc}.{msg}" if loc else msg
            loc = ""
        lines.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return "; ".join(dict.fromkeys(lines))


_NAMES_FIELD = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the tried union member ("str", "list[int]") into error locations.
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "bool"))
