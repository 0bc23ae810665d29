"""The ingress' front door (serve_app/guard.py) as plain ASGI, without Ray: what it reads of a
chunked body, what it answers, and that its in-flight count always comes back down."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app import guard

CAP = 100


def _scope(path: str = "/v1/score", headers: dict[str, str] | None = None) -> dict:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": raw,
            "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 8000)}  # fmt: skip


def _run(door: guard.Guard, scope: dict, pieces: list[bytes], disconnect: bool = False):
    """Send `pieces` as a chunked body (then a disconnect, if asked); returns (status or None,
    response body, pieces the guard and the app read, body the app got)."""
    events = [{"type": "http.request", "body": p, "more_body": True} for p in pieces]
    events.append(
        {"type": "http.disconnect"}
        if disconnect
        else {"type": "http.request", "body": b"", "more_body": False}
    )
    read, sent, got = [0], [], []

    async def receive():
        read[0] += 1
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        got.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    asyncio.run(door(scope, receive, send, app))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, read[0], (got[0] if got else None)


@pytest.fixture
def door() -> guard.Guard:
    return guard.Guard((b"key",), CAP, max_inflight=2, retry_after_s=1)


AUTH = {"authorization": "Bearer key"}


def test_a_chunked_body_reaches_the_route_whole(door):
    status, _, _, got = _run(door, _scope(headers=AUTH), [b"a" * 40, b"b" * 40, b"c" * 20])
    assert status == 200 and got == b"a" * 40 + b"b" * 40 + b"c" * 20
    assert door.inflight == 0


def test_a_chunked_body_over_the_cap_is_cut_off_at_the_cap(door):
    pieces = [b"x" * 30] * 1000  # 30 kB announced by nobody
    status, body, read, got = _run(door, _scope(headers=AUTH), pieces)
    assert status == 413 and got is None
    assert json.loads(body)["message"].startswith("body: larger than max_body_bytes=100")
    assert read <= CAP // 30 + 2  # stopped reading right past the cap
    assert door.inflight == 0


def test_a_client_gone_mid_upload_gets_no_answer_and_frees_its_slot(door):
    status, _, _, got = _run(door, _scope(headers=AUTH), [b"x" * 10], disconnect=True)
    assert status is None and got is None
    assert door.inflight == 0


def test_declared_length_over_the_cap_is_refused_unread(door):
    headers = AUTH | {"content-length": str(CAP + 1)}
    status, _, read, got = _run(door, _scope(headers=headers), [b"x" * (CAP + 1)])
    assert status == 413 and read == 0 and got is None


def test_no_key_no_read(door):
    status, _, read, got = _run(door, _scope(), [b"x"])
    assert status == 401 and read == 0 and got is None
    status, _, _, _ = _run(door, _scope("/health"), [])  # liveness needs no key
    assert status == 200


def test_full_house_gets_a_503_before_the_body_is_read(door):
    door.inflight = door.max_inflight
    status, _, read, got = _run(door, _scope(headers=AUTH), [b"x"])
    assert status == 503 and read == 0 and got is None
