"""The publish fast path (``frontend/ingest.py``): likes and comments answered off Tornado's
HTTP stack, on real frontend and dispatcher processes, and everything else handed to Tornado
with its bytes intact; the fast path's parser checked against Tornado's."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httputil import HTTPHeaders, parse_request_start_line

from frontend.ingest import TooLarge, parse_publish
from tests.helpers import health, viewer, wait_until

pytestmark = pytest.mark.topology


def post(video: str, kind: str = "likes", body: bytes = b'{"user":"u1"}', headers: tuple = (),
         chunked: bool = False) -> bytes:
    """A publish request; ``chunked``: the body as one chunk (a request the fast path leaves to
    Tornado, which must answer it the same way)."""
    lines = [f"POST /v1/videos/{video}/{kind} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers)]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        data = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        data = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict, object]:
    """One response: status, headers (lower-cased names), JSON body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return int(status_line.split()[1]), headers, json.loads(body) if body else None


async def connect(url: str):
    host, port = url.split("//")[1].split(":")
    return await asyncio.open_connection(host, int(port))


async def stats(url: str) -> dict:
    return (await health(url))["stats"]


async def test_likes_on_a_keep_alive_connection_are_answered_off_tornado(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    v = await viewer(f.url, "fast-1")
    before = await stats(f.url)
    reader, writer = await connect(f.url)
    acks = []
    for _ in range(3):
        writer.write(post("fast-1"))
        status, headers, body = await answer(reader)
        assert status == 202, (status, body)
        assert headers["content-type"] == "application/json; charset=UTF-8" and "date" in headers
        acks.append(body)
    writer.close()
    assert [a["seq"] for a in acks] == sorted(a["seq"] for a in acks) and len({a["id"] for a in acks}) == 3
    got = [json.loads(e.data)["id"] for e in await v.events(3)]
    assert got == [a["id"] for a in acks]
    after = await stats(f.url)
    assert after["ingest_fast"] - before.get("ingest_fast", 0) == 3
    assert after["ingest_handoffs"] - before["ingest_handoffs"] == 1  # the /healthz GET alone
    v.close()


async def test_pipelined_and_piecemeal_requests_stay_on_the_fast_path(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    before = await stats(f.url)
    reader, writer = await connect(f.url)
    writer.write(post("fast-2") + post("fast-2", body=b'{"user":"u2"}'))  # pipelined
    first, second = await answer(reader), await answer(reader)
    assert first[0] == second[0] == 202 and first[2]["seq"] < second[2]["seq"]
    request = post("fast-2")
    head_end = request.index(b"\r\n\r\n") + 4
    for piece in (request[:10], request[10:head_end], request[head_end:]):  # three segments
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)  # sleep-ok: a client writing its request in pieces, on purpose
    status, _, body = await answer(reader)
    assert status == 202 and body["seq"] > second[2]["seq"]
    writer.close()
    after = await stats(f.url)
    assert after["ingest_fast"] - before.get("ingest_fast", 0) == 3
    assert after["ingest_handoffs"] - before["ingest_handoffs"] == 1  # the /healthz GET alone


async def test_what_the_fast_path_does_not_serve_goes_to_tornado_with_its_bytes(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    v = await viewer(f.url, "fast-3")
    reader, writer = await connect(f.url)
    writer.write(post("fast-3"))
    assert (await answer(reader))[0] == 202
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection: Tornado's now
    status, _, body = await answer(reader)
    assert status == 200 and body["role"] == "frontend"
    writer.write(post("fast-3"))  # a like after the hand-over: Tornado's handler answers it
    assert (await answer(reader))[0] == 202
    writer.close()
    # each is Tornado's to answer: a chunked body and HTTP/1.0 are valid publishes; a folded
    # header line (obs-fold) is refused, as RFC 9112 (5.2) allows and Tornado >= 6.6 does,
    # since a proxy in front may unfold it differently (request smuggling)
    cases = [("chunked", post("fast-3", chunked=True), 202),
             ("HTTP/1.0", post("fast-3").replace(b"HTTP/1.1", b"HTTP/1.0", 1), 202),
             ("obs-fold", post("fast-3").replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\n folded\r\n", 1),
              400)]
    for name, request, expected in cases:
        reader, writer = await connect(f.url)
        writer.write(request)
        status, _, body = await answer(reader)
        assert status == expected, (name, status, body)
        writer.close()
    liked = 2 + sum(1 for _, _, expected in cases if expected == 202)
    assert len(await v.events(liked)) == liked
    v.close()
    text = open(f"{topology.log_dir}/f1.log", encoding="utf-8", errors="replace").read()
    assert "Traceback" not in text, text[-3000:]


CASES = [
    ("likes", b"", ()),
    ("likes", b'{"user":"ann"}', ()),
    ("comments", b'{"user":"ann","text":"hello"}', ()),
    ("comments", b'{"user":"ann"}', ()),                                  # missing_text
    ("likes", b'{"user":', ()),                                           # invalid_json
    ("likes", b'[1, 2]', ()),                                             # invalid_body
    ("likes", b'{"user":"a\\u0007b"}', ()),                               # invalid_user
    ("likes", b'\xff\xfe', ()),                                           # invalid_encoding
    ("likes", b"{}", (("Origin", "https://evil.example"),)),             # origin_not_allowed
    ("likes", b"{}", (("Origin", "https://app.example"),)),              # CORS headers
    ("comments", b'{"text":"' + b"x" * 100 + b'"}', ()),                  # body_too_large (64)
    ("likes", b"{}", (("Idempotency-Key", '"unclosed'),)),               # invalid_idempotency_key
    ("likes", b'{"id":5}', ()),                                           # invalid_idempotency_key
    ("likes", b'{"id":"a"}', (("Idempotency-Key", "b"),)),               # idempotency_key_mismatch
]
COMPARED = ("content-type", "access-control-allow-origin", "vary", "access-control-expose-headers",
            "retry-after", "www-authenticate")


async def test_both_paths_answer_every_case_alike(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.cors_origins": "https://app.example",
                                   "frontend.max_body_bytes": "64"})
    jwt = topology.frontend("f2", **{"security.auth": "jwt", "security.jwt_secret": "s" * 32})
    before = await stats(f.url)

    async def ask(url: str, video: str, kind: str, body: bytes, headers: tuple, chunked: bool):
        reader, writer = await connect(url)
        writer.write(post(video, kind, body, headers, chunked))
        try:
            return await answer(reader)
        finally:
            writer.close()

    cases = [(f.url, "same-1", *case) for case in CASES]
    cases += [(f.url, "bad!video", "likes", b"", ()), (jwt.url, "same-2", "likes", b"", ())]  # invalid_video, 401
    for url, video, kind, body, headers in cases:
        fast = await ask(url, video, kind, body, headers, False)
        slow = await ask(url, video, kind, body, headers, True)
        what = (video, kind, body, headers, fast, slow)
        assert fast[0] == slow[0], what
        assert {k: fast[1].get(k) for k in COMPARED} == {k: slow[1].get(k) for k in COMPARED}, what
        if fast[0] == 202:
            assert set(fast[2]) == set(slow[2]) == {"id", "video", "epoch", "seq", "sse_id"}, what
        else:
            assert fast[2]["error"] == slow[2]["error"], what
    after = await stats(f.url)
    # on f: every case but the body over 64 bytes (Tornado's), plus the bad video id
    assert after["ingest_fast"] - before.get("ingest_fast", 0) == len(CASES)


async def test_a_flood_from_one_address_is_limited_on_the_fast_path_as_on_tornado(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.ip_rate": "1", "security.ip_burst": "3"})
    reader, writer = await connect(f.url)
    statuses = []
    for _ in range(6):
        writer.write(post("flood-1"))
        status, headers, body = await answer(reader)
        statuses.append(status)
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "rate_limited"
    writer.close()
    assert statuses[:3] == [202] * 3 and 429 in statuses[3:]
    assert (await stats(f.url))["rate_limited"] >= 1


async def test_connection_close_is_honoured(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    reader, writer = await connect(f.url)
    writer.write(post("close-1", headers=(("Connection", "close"),)))
    status, headers, _ = await answer(reader)
    assert status == 202 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the answer
    writer.close()


async def test_idle_and_unfinished_connections_are_closed_after_the_header_timeout(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.header_timeout": "1"})
    idle = await connect(f.url)
    unfinished = await connect(f.url)
    unfinished[1].write(post("slow-1", body=b'{"user":"u1"}')[:-5])  # the body's last bytes never come
    for reader, writer in (idle, unfinished):
        try:  # closed, no answer (a reset when unread bytes were left behind)
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()
    reader, writer = await connect(f.url)  # and the frontend still answers
    writer.write(post("slow-1"))
    assert (await answer(reader))[0] == 202
    writer.close()


# --- the parser against Tornado's ---------------------------------------------------------------

NAMES = ["Host", "Origin", "Content-Length", "content-length", "Cookie", "Authorization", "Connection",
         "Content-Type", "X-Thing", "Transfer-Encoding", "Expect", "Upgrade", "Bad Name", ""]
VALUE_CHARS = st.sampled_from(list("ab:/ 09\t,;=") + ["\x00", "\r", "\n", "\x7f", "\xe9", "\r\n", "\r\n "])


@st.composite
def requests(draw) -> bytes:
    video = draw(st.sampled_from(["v1", "bench-0", "a.b_c", "bad!id", "x%2Fy", "é", "v/w"]))
    kind = draw(st.sampled_from(["likes", "comments", "presence"]))
    query = draw(st.sampled_from(["", "?a=1", "?x y"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2"]))
    method = draw(st.sampled_from(["POST", "POST", "GET", "post"]))
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    body = draw(st.binary(max_size=40))
    fields = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(NAMES))
        if name.lower() == "content-length":
            value = draw(st.sampled_from([str(len(body)), str(len(body)), " 1", "x", "-1", "99999"]))
        else:
            value = "".join(draw(st.lists(VALUE_CHARS, max_size=12)))
        fields.append(f"{name}:{value}")
    head = eol.join([f"{method} /v1/videos/{video}/{kind}{query} {version}", *fields]) + eol + eol
    return head.encode("latin-1") + body


@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=requests())
def test_what_the_fast_path_parses_tornado_parses_the_same(data):
    """Whatever the bytes, ``parse_publish`` (llhttp) does not raise; a request it takes,
    Tornado's parser reads the same way: method, path, and every field the fast path reads."""
    parsed = parse_publish(data, 16384)
    if parsed is None or isinstance(parsed, int):
        return
    text = data.decode("latin-1")
    end = text.index("\r\n\r\n")
    start_line, _, block = text[:end + 2].partition("\r\n")
    start = parse_request_start_line(start_line)
    headers = HTTPHeaders.parse(block)  # raises on what Tornado refuses
    if isinstance(parsed, TooLarge):  # refused from its head: Tornado reads the same length
        assert (start.method, start.path.split("?")[0]) == ("POST", parsed.path)
        assert int(headers["Content-Length"]) == parsed.length > 16384
        return
    video, kind, target, fields, body, length = parsed
    assert (start.method, start.path, start.version) == ("POST", target, "HTTP/1.1")
    assert target.split("?")[0] == f"/v1/videos/{video}/{kind}s"
    for name, value in fields.items():
        assert headers.get(name) == value, (name, value, headers.get(name))
    assert sum(1 for k, _ in headers.get_all() if k.lower() in ("transfer-encoding", "expect", "upgrade")) == 0
    assert int(headers.get("Content-Length", "0")) == len(body) and length == len(data[:end + 4]) + len(body)


async def test_an_idempotency_key_names_one_event_on_both_paths_and_in_either_place(topology):
    """The same key -- as a bare or a quoted ``Idempotency-Key``, or as the body's ``id`` -- on
    the fast path and on Tornado's is one event: one placement, delivered once."""
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    v = await viewer(f.url, "keyed-1")
    reader, writer = await connect(f.url)
    try:
        answers = []
        for body, headers, chunked in [(b"{}", (("Idempotency-Key", "order-17"),), False),
                                       (b"{}", (("Idempotency-Key", '"order-17"'),), True),
                                       (b'{"id":"order-17"}', (), False),
                                       (b'{"id":"order-17"}', (("Idempotency-Key", '"order-17"'),), False)]:
            writer.write(post("keyed-1", "likes", body, headers, chunked))
            answers.append(await answer(reader))
        writer.write(post("keyed-1", "likes", b"{}", (("Idempotency-Key", "marker"),)))
        marker = await answer(reader)
        writer.write(post("keyed-1", "likes", b"{}", (("Idempotency-Key", "a"), ("Idempotency-Key", "b"))))
        repeated = await answer(reader)  # the fast path hands it to Tornado, which joins the two
    finally:
        writer.close()
    first = answers[0][2]
    assert [a[0] for a in answers] == [202] * 4 and all(a[2] == first for a in answers), answers
    assert first["id"].startswith("k") and marker[0] == 202 and marker[2]["id"] != first["id"]
    assert repeated[0] == 400 and repeated[2]["error"]["code"] == "invalid_idempotency_key", repeated
    got = await v.events(2, kinds={"like"})
    assert [json.loads(e.data)["id"] for e in got] == [first["id"], marker[2]["id"]]
    assert got[0].id == first["sse_id"]
