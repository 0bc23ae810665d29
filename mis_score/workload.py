"""The reference workload (DESIGN.md section 5) as request bodies, shared by Locust and the
benchmarks so they send the same thing."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

YES, NO = 9454, 2753


@dataclasses.dataclass(frozen=True)
class Workload:
    query_tokens: int = 2000
    items: int = 500
    item_tokens: int = 20
    label_ids: tuple[int, ...] = (YES, NO)
    apply_softmax: bool = True

    @classmethod
    def from_env(cls) -> Workload:
        """MIS_QUERY_TOKENS, MIS_ITEMS, MIS_ITEM_TOKENS, MIS_LABELS ("9454,2753")."""
        d = cls()
        labels = os.environ.get("MIS_LABELS")
        return cls(
            query_tokens=int(os.environ.get("MIS_QUERY_TOKENS", d.query_tokens)),
            items=int(os.environ.get("MIS_ITEMS", d.items)),
            item_tokens=int(os.environ.get("MIS_ITEM_TOKENS", d.item_tokens)),
            label_ids=tuple(int(x) for x in labels.split(",")) if labels else d.label_ids,
        )

    def body(self, seed: int) -> dict[str, Any]:
        """A token-id request; a new seed gives a new query and new items."""
        rng = np.random.default_rng(seed)
        return {
            "query": rng.integers(0, 151_000, self.query_tokens).tolist(),
            "items": rng.integers(0, 151_000, (self.items, self.item_tokens)).tolist(),
            "label_token_ids": list(self.label_ids),
            "apply_softmax": self.apply_softmax,
        }


def check_response(payload: Any, workload: Workload) -> str | None:
    """None when the response is a well-formed answer for `workload`, else what is wrong."""
    scores = payload.get("scores") if isinstance(payload, dict) else None
    if not isinstance(scores, list):
        return "no scores"
    if len(scores) != workload.items:
        return f"{len(scores)} score rows for {workload.items} items"
    arr = np.asarray(scores, dtype=float)
    if arr.shape != (workload.items, len(workload.label_ids)):
        return f"scores shape {arr.shape}"
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        return "a probability outside [0, 1]"
    return None
