"""Hypothesis fuzzing with a bounded budget (the file runs in well under a minute):

* the wire decoders (``Control.from_frames``, ``FanoutMessage.from_frames`` and the body readers):
  whatever a peer sends, only ``RemoteProtocolError`` comes out;
* the HTTP API of live frontends (auth off and auth on): random methods, paths, headers and
  bodies get only documented status codes and JSON error bodies, never a 500, and the node
  serves normally afterwards.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
import urllib.parse

import jwt
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.wire import protocol as P
from mesh.errors import RemoteProtocolError

from helpers import health, like, viewer

WIRE = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SECRET = "fuzz-secret-0123456789-0123456789-abc"

# --- the wire -----------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=12)
event_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=70), scalars), "video": st.sampled_from(["v1", "a" * 65, "-x", 5, None]),
     "kind": st.sampled_from(["like", "comment", "boo", None]), "user": st.one_of(st.none(), st.text(max_size=5), scalars),
     "text": st.one_of(st.none(), st.text(max_size=5)), "ts": st.one_of(st.floats(), st.booleans(), scalars),
     "epoch": st.one_of(st.integers(-5, 5), scalars), "seq": st.one_of(st.integers(-5, 5), scalars),
     "prev": st.one_of(st.none(), st.lists(st.integers(-3, 3), max_size=3), scalars)},
    optional={"fwd": st.booleans()})
#: events as a peer may send them: rows of event-like fields (with or without a ``dc``), maps of
#: the same fields (not the wire form: malformed), any list
event_any = st.one_of(
    event_like,
    st.tuples(event_like, st.one_of(st.none(), st.text(max_size=70), scalars)).map(
        lambda p: [p[0][k] for k in ("id", "video", "kind", "user", "text", "ts", "epoch", "seq", "prev")]
        + ([] if p[1] is None else [p[1]])),
    st.lists(scalars, max_size=11))
bodies = st.one_of(
    st.binary(max_size=64),
    values.map(msgpack.packb),
    st.fixed_dictionaries({}, optional={"events": st.one_of(st.lists(event_any, max_size=3), values),
                                        "epoch": values, "seqs": st.one_of(st.lists(values, max_size=3), values),
                                        "video": st.one_of(st.text(max_size=8), values),
                                        "after": st.one_of(st.none(), st.lists(st.integers(-2, 2), max_size=3), values),
                                        "reset": values}).map(lambda d: msgpack.packb(d, use_bin_type=True)),
)
magics = st.one_of(st.just(P.MAGIC_V1), st.just(b"LM\x02"), st.binary(max_size=5))
types = st.one_of(st.sampled_from(sorted(P.CONTROL_TYPES)), st.binary(max_size=6))


def only_remote_errors(fn, *args):
    try:
        return fn(*args)
    except RemoteProtocolError:
        return None


@WIRE
@given(st.one_of(st.lists(st.binary(max_size=40), max_size=6),
                 st.tuples(magics, types, st.binary(min_size=0, max_size=40), bodies).map(list)))
def test_control_decoder_only_raises_remote_protocol_errors(frames):
    msg = only_remote_errors(P.Control.from_frames, frames)
    if msg is None:
        return
    assert isinstance(msg.body, dict)
    for reader in (P.publish_events, P.publish_items, lambda m: P.ack_positions(m, 2), P.history_request,
                   P.history_reply):
        only_remote_errors(reader, msg)


topics = st.one_of(st.binary(max_size=20), st.text(max_size=70).map(lambda t: b"v/" + t.encode() + b"\x00"),
                   st.sampled_from([b"v/v1\x00", b"v/\x00", b"v/v1", b"v/\xff\x00"]))
payloads = st.one_of(
    st.binary(max_size=64), values.map(msgpack.packb),
    st.fixed_dictionaries({}, optional={"v": st.one_of(st.just(1), values), "k": st.sampled_from(["E", "S", "T", "X", 1]),
                                        "from": st.one_of(st.text(max_size=5), values),
                                        "events": st.one_of(st.lists(event_any, max_size=3), values),
                                        "tail": st.one_of(st.lists(st.integers(-2, 3), max_size=3), values)}
                          ).map(lambda d: msgpack.packb(d, use_bin_type=True)))


@WIRE
@given(st.one_of(st.lists(st.binary(max_size=30), max_size=4), st.tuples(topics, payloads).map(list)))
def test_fanout_decoder_only_raises_remote_protocol_errors(frames):
    msg = only_remote_errors(P.FanoutMessage.from_frames, frames)
    if msg is not None:
        assert P.valid_video_id(msg.video) and msg.kind in ("E", "S", "T")


def test_decoders_accept_what_the_encoders_make():
    event = P.make_event("v1", "comment", "ann", "hi\n")
    ctl = P.Control(P.MSG_PUBLISH, b"r", P.publish_body([P.event_row(event)]))
    assert list(map(P.row_event, P.publish_events(P.Control.from_frames(ctl.to_frames())))) == [event]
    fan = P.FanoutMessage("v1", P.FANOUT_EVENTS, "d1", [P.event_row(event)])
    assert list(map(P.row_event, P.FanoutMessage.from_frames(fan.to_frames()).events)) == [event]
    [(count, data)] = P.pack_events([P.event_row(event)])
    packed = P.FanoutMessage.from_frames(P.packed_fanout_events("v1", "d1", count, data))
    assert list(map(P.row_event, packed.events)) == [event]


# --- the HTTP API ---------------------------------------------------------------------------------

#: every status the API documents (docs/API.md, "Errors"), plus 200/202/204 successes
DOCUMENTED = {200, 202, 204, 400, 401, 403, 404, 405, 413, 429, 503}

videos = st.one_of(st.sampled_from(["ok", "priv-1", "v.1_x-2", "-bad", "a" * 65, "%ff", "%00", "..", "a%2Fb"]),
                   st.text(max_size=12).map(lambda t: urllib.parse.quote(t, safe="")))
paths = st.one_of(
    st.tuples(videos, st.sampled_from(["likes", "comments", "events", "presence", "", "x"])).map(
        lambda p: f"/v1/videos/{p[0]}/{p[1]}"),
    st.sampled_from(["/healthz", "/", "/metrics", "/v1", "/v1/videos", "/static/../../etc/passwd", "//x"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda t: "/" + t),
)


@st.composite
def calls(draw):
    """(method, path): mostly the right method on an API route (so bodies and tokens get
    parsed), sometimes anything anywhere."""
    if draw(st.integers(0, 9)) < 7:
        video = draw(st.one_of(st.sampled_from(["ok", "priv-1", "z.9_-"]), videos))
        method, route = draw(st.sampled_from([("POST", "likes"), ("POST", "comments"), ("POST", "comments"),
                                              ("GET", "events"), ("OPTIONS", "likes")]))
        return method, f"/v1/videos/{video}/{route}"
    return draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])), draw(paths)

queries = st.one_of(st.just(""), st.dictionaries(st.sampled_from(["lastEventId", "access_token", "user", "offset",
                                                                  "limit", "x"]),
                                                 st.text(max_size=12), max_size=3).map(
    lambda d: "?" + urllib.parse.urlencode(d) if d else ""))
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


def _tokens():
    now = time.time()
    good = jwt.encode({"sub": "fuzzer", "exp": now + 300, "aud": "livemesh"}, SECRET, algorithm="HS256")
    sub = jwt.encode({"sub": "fuzzer", "exp": now + 60, "iat": now, "aud": "livemesh-subscribe"}, SECRET,
                     algorithm="HS256")
    return st.one_of(header_values, st.sampled_from([f"Bearer {good}", f"Bearer {sub}", "Bearer ", "Basic x",
                                                     f"Bearer {good[:-3]}abc"]))


json_bodies = st.one_of(
    st.binary(max_size=200),
    values.map(lambda v: json.dumps(v, default=repr).encode()),
    st.fixed_dictionaries({}, optional={"user": st.one_of(st.text(max_size=70), values),
                                        "text": st.one_of(st.text(max_size=50), values)}).map(
        lambda d: json.dumps(d, default=repr).encode()),
    st.integers(1, 40).map(lambda n: b'{"text": "x", "d": ' + b"[" * n + b"]" * n + b"}"),
)


def _request(host, port, method, path, headers, body):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        ctype = resp.getheader("Content-Type", "")
        data = b"" if ctype.startswith("text/event-stream") else resp.read()
        return resp.status, ctype, data
    finally:
        conn.close()


@pytest.mark.topology
def test_http_api_fuzz(topology):
    topology.dispatcher("d1")
    open_f = topology.frontend("f1", **{"frontend.sync_timeout": "0.5"})
    secure_f = topology.frontend("f2", **{"security.auth": "jwt", "security.jwt_secret": SECRET,
                                          "security.private_videos": "priv-*", "frontend.sync_timeout": "0.5",
                                          "security.cors_origins": "https://ok.example"})
    targets = [urllib.parse.urlsplit(f.url) for f in (open_f, secure_f)]
    seen: dict[int, int] = {}

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(target=st.sampled_from(targets), call=calls(), query=queries, body=st.one_of(st.none(), json_bodies),
           auth=st.one_of(st.none(), _tokens()), origin=st.one_of(st.none(), st.none(), header_values, st.just("https://ok.example")),
           last_id=st.one_of(st.none(), header_values), ctype=st.one_of(st.none(), header_values))
    def run(target, call, query, body, auth, origin, last_id, ctype):
        method, path = call
        headers = {k: v for k, v in (("Authorization", auth), ("Origin", origin), ("Last-Event-ID", last_id),
                                     ("Content-Type", ctype)) if v is not None}
        status, content_type, data = _request(target.hostname, target.port, method, path + query, headers, body)
        seen[status] = seen.get(status, 0) + 1
        assert status in DOCUMENTED, (status, method, path, data[:200])
        # the page routes (frontend/page.py: /, /static/, /metrics) are not the JSON API: their
        # errors are Tornado's HTML pages
        route = path.partition("?")[0]  # as Tornado routes it
        page = route in ("/", "/metrics") or route.startswith("/static/")
        if status >= 400 and not page:
            assert content_type.startswith("application/json"), (status, content_type, data[:200])
            err = json.loads(data)["error"]
            assert isinstance(err["code"], str) and isinstance(err["message"], str)
            assert isinstance(err["retryable"], bool)

    run()
    print(f"statuses seen: {dict(sorted(seen.items()))}")
    assert 500 not in seen

    # both nodes still serve: health, a viewer, a like
    async def still_serving():
        for f in (open_f, secure_f):
            assert (await health(f.url))["status"] == "ok"
        v = await viewer(open_f.url, "after-fuzz")
        sent = await like(open_f.url, "after-fuzz")
        assert json.loads((await v.events(1))[0].data)["id"] == sent["id"]
        v.close()

    asyncio.run(still_serving())
    for f in (open_f, secure_f):
        text = open(os.path.join(topology.log_dir, f"{f.name}.log"), encoding="utf-8", errors="replace").read()
        assert "Traceback" not in text and "Uncaught exception" not in text, text[-3000:]
