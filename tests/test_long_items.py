"""Items over the limit (mis_api/long_items.py): refused, truncated, or cut into windows whose
scores are pooled; the suffix (a template's end) always survives. The rules on token ids, then
the scores of cut and windowed items against transformers on the prompts cut by hand, and
against the windows scored one by one, in every mode."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from mis_api.long_items import MAX_WINDOWS, LongItems, Windows, fit_items
from mis_api.schema import ScoreRequest, validation_message
from mis_api.scoring import prepare_request
from mis_score.offline import OfflineScorer
from models.engine_config import EngineConfig
from models.inputs import ScoringInputError
from serve_app.config import RerankArgs
from serve_app.rerank import RerankPrompt, RerankRequest
from tests.conftest import LABELS, TEST_ENGINE, hf_reference

LIMIT = TEST_ENGINE["max_item_tokens"]  # 64
SUFFIX = [151645, 198, 151644, 77091, 198]  # 5 template tokens after every item
BUDGET = LIMIT - len(SUFFIX)  # an item's own tokens that fit


def own(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def fit(items, policy: LongItems, prefix=()):
    return fit_items(7, items, policy, LIMIT, prefix=prefix, suffix=SUFFIX)


def windows_of(item: list[int], size: int, overlap: int = 0, most: int = MAX_WINDOWS):
    """The windows the README describes: from the start, each `overlap` into the one before,
    the last one ending at the item's end, at most `most`."""
    starts = list(range(0, max(len(item) - overlap, 1), size - overlap))[:most]
    if starts[-1] + size >= len(item):
        starts[-1] = max(len(item) - size, 0)
    return [item[s : s + size] for s in starts]


def test_items_within_the_limit_are_untouched_and_framed():
    items = [own(1), own(BUDGET - 1), own(BUDGET)]
    for mode in ("refuse", "truncate", "chunk"):
        fitted = fit(items, LongItems(mode=mode))
        assert fitted.items == [it + SUFFIX for it in items]
        assert fitted.windows is None
    framed = fit_items(7, [own(3)], LongItems(), LIMIT, prefix=[5, 6], suffix=SUFFIX)
    assert framed.items == [[5, 6, *own(3), *SUFFIX]]


def test_one_token_over_is_refused_naming_the_item_and_its_length():
    with pytest.raises(ScoringInputError, match=rf"^items\[1\]: {LIMIT + 1} tokens exceed "):
        fit([own(3), own(BUDGET + 1)], LongItems())
    # A request's own limits, under the server's: named as the request's fields, its values.
    with pytest.raises(
        ScoringInputError, match=r"^items\[0\]: 11 tokens exceed long_items.max_tok"
    ):
        fit([own(11)], LongItems(max_tokens=10))
    with pytest.raises(ScoringInputError, match=r"^items\[0\]: a prompt of 31 tokens exceeds "):
        fit([own(19)], LongItems(max_prompt_tokens=30))  # 7 query + 19 + 5 suffix
    fit([own(18)], LongItems(max_prompt_tokens=30))


def test_truncation_cuts_the_items_own_tokens_from_either_end():
    long = own(BUDGET + 30)
    right = fit([long], LongItems(mode="truncate")).items[0]
    left = fit([long], LongItems(mode="truncate", side="left")).items[0]
    assert right == long[:BUDGET] + SUFFIX and len(right) == LIMIT
    assert left == long[-BUDGET:] + SUFFIX
    assert fit([long], LongItems(mode="truncate", max_tokens=9)).items == [long[:9] + SUFFIX]
    # A cap above the server's limit is the server's limit (Cohere's max_tokens_per_doc).
    assert fit([long], LongItems(mode="truncate", max_tokens=4096)).items == [right]
    # vLLM's truncate_prompt_tokens: the whole prompt, query and frame included.
    whole = LongItems(mode="truncate", max_prompt_tokens=30)
    assert fit([long], whole).items == [long[:18] + SUFFIX]
    with pytest.raises(ScoringInputError, match=r"^long_items.max_prompt_tokens: 12 leaves no "):
        fit([long], LongItems(mode="truncate", max_prompt_tokens=12))
    # A prefix (a template's part before the document) is in every piece, never cut.
    framed = fit([long], LongItems(mode="truncate", side="left"), prefix=[5, 6])
    assert framed.items == [[5, 6, *long[-(BUDGET - 2) :], *SUFFIX]]


def test_windows_cover_the_item_with_overlap_up_to_max_chunks():
    n = 3 * BUDGET + 5
    long = own(n)
    fitted = fit([own(4), long], LongItems(mode="chunk", overlap=8))
    want = windows_of(long, BUDGET, 8)
    assert fitted.items == [own(4) + SUFFIX] + [w + SUFFIX for w in want]
    assert fitted.windows == Windows((1, len(want)), "max", 0)
    assert [len(w) for w in want] == [BUDGET] * len(want)  # the last one too: no fragment
    assert want[-1][-1] == long[-1] and want[1][:8] == want[0][-8:]
    # One token over: two windows, the second the last BUDGET tokens.
    over = fit([own(BUDGET + 1)], LongItems(mode="chunk")).items
    assert over == [own(BUDGET) + SUFFIX, own(BUDGET + 1)[1:] + SUFFIX]
    # One window allowed: the right-truncated item; two: the first two.
    one = fit([long], LongItems(mode="chunk", max_chunks=1))
    assert one.items == fit([long], LongItems(mode="truncate")).items
    two = fit([long], LongItems(mode="chunk", max_chunks=2))
    assert two.items == [long[:BUDGET] + SUFFIX, long[BUDGET : 2 * BUDGET] + SUFFIX]
    framed = fit([long], LongItems(mode="chunk"), prefix=[5, 6]).items
    assert framed == [[5, 6, *w, *SUFFIX] for w in windows_of(long, BUDGET - 2)]


def test_pooling_picks_the_row_of_the_best_window_or_averages():
    scores = np.array([[0.1, 0.9], [0.7, 0.3], [0.2, 0.8], [0.7, 0.1], [0.4, 0.6]])
    w = Windows((1, 3, 1))
    # The best first column: rows 1 and 3 tie at 0.7, the first (in text order) wins.
    assert w.pool_scores(scores).tolist() == [[0.1, 0.9], [0.7, 0.3], [0.4, 0.6]]
    assert Windows((1, 3, 1), "first").pool_scores(scores)[1].tolist() == [0.7, 0.3]
    assert np.allclose(Windows((1, 3, 1), "mean").pool_scores(scores)[1], [1.6 / 3, 1.2 / 3])
    assert Windows((4, 1), "max", 1).pool_scores(scores)[0].tolist() == [0.1, 0.9]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"max_tokens": 0}, "long_items.max_tokens"),
        ({"max_tokens": -5}, "long_items.max_tokens"),
        ({"max_chunks": 0}, "long_items.max_chunks"),
        ({"max_chunks": MAX_WINDOWS + 1}, "long_items.max_chunks"),
        ({"overlap": -1}, "long_items.overlap"),
        ({"mode": "chunk", "max_tokens": 8, "overlap": 8}, "long_items.overlap"),
        ({"mode": "squash"}, "long_items.mode"),
        ({"pool": "median"}, "long_items.pool"),
    ],
)
def test_bad_options_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValidationError) as e:
        ScoreRequest(query=[1], items=[[2]], label_token_ids=[3], long_items=bad)
    assert validation_message(e.value).startswith(f"{field}: "), validation_message(e.value)


def test_an_overlap_as_long_as_the_servers_window_is_refused():
    with pytest.raises(ScoringInputError, match=rf"^long_items.overlap: {BUDGET} tokens must be"):
        fit([own(BUDGET + 1)], LongItems(mode="chunk", overlap=BUDGET))


def test_a_template_is_tokenized_whole_and_cut_in_parts(tokenizer):
    """The rerank path gives the template's parts around the document as the items' prefix
    and suffix. A document that fits is its whole prompt's tokens, whatever the template; one
    over the limit is cut in parts (the frame's tokens and the document's apart, so a cut never
    touches the frame). For Qwen3-Reranker's template the parts are the whole prompt's tokens
    (its end starts with a special token); for one whose end merges with the text they are not,
    and the start check finds it (RerankPrompt.split_differs)."""
    tok = tokenizer("qwen3")
    qwen3 = RerankArgs().document_template
    merging = "Document: {document}\nRelevant:"  # ".\n" is one token: the end merges
    assert RerankPrompt("{query}", qwen3, "").split_differs(tok.encode) is None
    assert RerankPrompt("{query}", merging, "").split_differs(tok.encode) is not None
    eng = EngineConfig(max_batch_tokens=1024, max_item_tokens=40, max_query_tokens=64)
    docs = ["Ultrabook, 1.1 kg.", "two\nlines\n", " ".join(f"w{i}" for i in range(60))]
    for template in (qwen3, merging):
        prompt = RerankPrompt("{query}", template, "")
        cut = LongItems(mode="chunk", max_chunks=2)
        req = prompt.score_request(RerankRequest(query="q", documents=docs), (9454,), cut)
        _, items, windows = prepare_request(req, tok, vocab_size=151936, engine=eng, max_items=99)
        assert windows is not None and windows.counts == (1, 1, 2)
        for doc, item in zip(docs[:2], items[:2], strict=True):
            assert item == tok.encode(template.replace("{document}", doc)), (template, doc)
        head, lead, after = prompt.frame()
        frame = (tok.encode(head) if head else [], tok.encode(after))
        own = tok.encode(lead + docs[2])
        size = 40 - len(frame[0]) - len(frame[1])
        assert items[2:] == [frame[0] + w + frame[1] for w in windows_of(own, size, 0, 2)]


# ----------------------------------------------------------------------------- scores

QUERY = list(range(2000, 2037))
ITEMS = [own(BUDGET - 1, 3000), own(BUDGET, 4000), own(BUDGET + 1, 5000), own(3 * BUDGET + 5)]


def _score(engine, mode: str, long_items: dict) -> dict:
    scorer = OfflineScorer(engine("qwen3", mode), "tiny", max_items=100)
    body = {
        "query": QUERY,
        "items": ITEMS,
        "item_suffix": SUFFIX,
        "label_token_ids": LABELS,
        "apply_softmax": True,
        "long_items": long_items,
    }
    return scorer.score_body(body)


@pytest.mark.parametrize("mode", ["serial", "packed", "prefix"])
def test_cut_and_windowed_items_score_as_transformers_on_the_prompts_cut_by_hand(
    engine, ckpts, record, mode
):
    right = [it[:BUDGET] + SUFFIX for it in ITEMS]
    left = [it[-BUDGET:] + SUFFIX for it in ITEMS]
    for policy, prompts in (({"mode": "truncate"}, right), ({"side": "left"}, left)):
        out = _score(engine, mode, {"mode": "truncate"} | policy)
        assert "windows" not in out
        assert out["usage"]["prompt_tokens"] == len(QUERY) + sum(map(len, prompts))
        soft, _ = hf_reference(ckpts["qwen3"], QUERY, prompts, LABELS)
        diff = np.abs(np.array(out["scores"]) - soft).max()
        record("long items: truncated vs transformers, softmax", diff)
        assert diff <= 1e-4

    # Windows of 40 own tokens, 10 shared: each an item; a document's score is its best
    # window's row, bit for bit what that window gets scored alone.
    out = _score(engine, mode, {"mode": "chunk", "max_tokens": 40, "overlap": 10})
    cut = [[w + SUFFIX for w in windows_of(it, 40, 10)] for it in ITEMS]
    assert out["windows"] == [len(w) for w in cut] == [2, 2, 2, 6]
    flat = [w for ws in cut for w in ws]
    soft, _ = hf_reference(ckpts["qwen3"], QUERY, flat, LABELS)
    alone = OfflineScorer(engine("qwen3", mode), "tiny", max_items=100)
    at = 0
    for i, ws in enumerate(cut):
        rows = []
        for w in ws:
            one = alone.score_body(
                {"query": QUERY, "items": [w], "label_token_ids": LABELS, "apply_softmax": True}
            )
            rows.append(one["scores"][0])
        best = int(np.argmax([r[0] for r in rows]))
        assert out["scores"][i] == rows[best]  # bit for bit
        diff = np.abs(np.array(out["scores"][i]) - soft[at + best]).max()
        record("long items: best window vs transformers, softmax", diff)
        assert diff <= 1e-4
        at += len(ws)
    assert out["usage"]["prompt_tokens"] == len(QUERY) + sum(map(len, flat))


def test_refused_by_default_naming_the_item(engine):
    out = OfflineScorer(engine("qwen3", "prefix"), "tiny", max_items=100).score_body(
        {"query": QUERY, "items": ITEMS, "item_suffix": SUFFIX, "label_token_ids": LABELS}
    )
    assert out["code"] == 400
    assert out["message"] == f"items[2]: {LIMIT + 1} tokens exceed max_item_tokens={LIMIT}"


def test_batch_rows_cut_long_items_as_the_score_api(engine):
    """`mis-score batch`: pair rows (one item each) with `--long-items` / `--item-suffix` as
    the rows' defaults, grouped by query into one request, get each item's pooled score as
    the Score API gives it; a row's own `long_items` wins over the default, and rows of one
    query pooled differently are not pooled alike."""
    from mis_score.batch import Layout, RowDefaults, RowScorer

    policy = {"mode": "chunk", "max_tokens": 40, "overlap": 10}
    mean = policy | {"pool": "mean"}
    defaults = RowDefaults(
        label_token_ids=LABELS, apply_softmax=True, item_suffix=SUFFIX, long_items=policy
    )
    scorer = OfflineScorer(engine("qwen3", "prefix"), "tiny", max_items=100)
    rows = [{"query": QUERY, "item": it} for it in ITEMS]
    rows += [{"query": QUERY, "item": it, "long_items": mean} for it in ITEMS]
    rows.append({"query": QUERY, "item": ITEMS[3], "long_items": {"mode": "truncate"}})
    out = RowScorer(scorer, defaults, Layout.PAIRS).score_rows(rows)
    assert all(error is None for _, error in out)
    assert [scores for scores, _ in out[:4]] == _score(engine, "prefix", policy)["scores"]
    assert [scores for scores, _ in out[4:8]] == _score(engine, "prefix", mean)["scores"]
    assert out[0][0] != out[4][0]  # max and mean differ: the two groups were kept apart
    assert out[8][0] == _score(engine, "prefix", {"mode": "truncate"})["scores"][3]


def test_an_empty_document_in_a_framed_template_is_its_frame(tokenizer):
    """An empty document in a template with no space before `{document}` is an empty item in
    its frame: scored as the filled template, as before the frame was split off."""
    tok = tokenizer("qwen3")
    eng = EngineConfig(max_batch_tokens=1024, max_item_tokens=64, max_query_tokens=64)
    for template in ("<d>{document}</d>", "{document}\nRelevant:", RerankArgs().document_template):
        prompt = RerankPrompt("{query}", template, "")
        req = prompt.score_request(RerankRequest(query="q", documents=["ok", ""]), (9454,))
        _, items, _ = prepare_request(req, tok, vocab_size=151936, engine=eng, max_items=9)
        assert items == [tok.encode(template.replace("{document}", d)) for d in ("ok", "")]


def test_rerank_errors_name_the_requests_own_options_anywhere_in_the_message():
    """The Score API's long_items names become /v1/rerank's wherever the message names them,
    and a request's own limit is a limit (TEI's 413, not its 422)."""
    from serve_app import errors
    from serve_app.ingress import _named

    rename = _named(RerankRequest(query="q", documents=[], long_documents={}).renames())
    message = rename("items[1]: 690 tokens exceed long_items.max_tokens=5")
    assert message == "documents[1]: 690 tokens exceed long_documents.max_tokens=5"
    assert errors.input_kind(message) is errors.ErrorKind.LIMIT
    vllm = _named(RerankRequest(query="q", documents=[], truncate_prompt_tokens=9).renames())
    assert vllm("items[0]: a prompt of 12 tokens exceeds long_items.max_prompt_tokens=9") == (
        "documents[0]: a prompt of 12 tokens exceeds truncate_prompt_tokens=9"
    )
    # Too many windows: the option the client sent, or /v1/rerank's default when it sent none.
    cap = "items: 3 items cut into 30 windows exceed max_items_per_request=16 (fewer {}, or fewer"
    for request, named in (
        ({"max_chunks_per_doc": 10}, "max_chunks_per_doc"),
        ({"long_documents": {"mode": "chunk"}}, "long_documents.max_chunks"),
        ({}, "max_chunks_per_doc (default 10) or long_documents.max_chunks"),
    ):
        rename = _named(RerankRequest(query="q", documents=[], **request).renames())
        message = rename(cap.format("long_items.max_chunks") + " items)")
        assert message == "documents" + cap.format(named)[5:] + " items)", request


def test_the_python_client_sends_the_long_item_options_the_server_reads():
    """The client's score/rerank options are the request fields the server validates."""
    from mis_api.schema import ScoreRequest
    from mis_score.client import _rerank_body, _score_body
    from serve_app.rerank import RerankRequest

    body = _score_body(
        "q", ["a", "b"], [1, 2], False, False, "ranker-de",
        long_items={"mode": "chunk", "max_tokens": 8, "overlap": 2}, item_prefix=None,
        item_suffix="<end>",
    )  # fmt: skip
    req = ScoreRequest.model_validate(body)
    assert req.long_items.mode == "chunk" and req.item_suffix == "<end>" and req.item_prefix is None
    assert req.model == "ranker-de"
    rerank = _rerank_body(
        "q", ["d"], None, False, None, long_documents={"mode": "truncate"}, instruction="Judge"
    )
    parsed = RerankRequest.model_validate(rerank)
    assert parsed.long_documents.mode == "truncate" and parsed.instruction == "Judge"
