"""Security: JWT publishing and private videos, rate limits, input limits, CORS, connection
limits, slowloris, shedding at the open-file limit.  Sans-IO cores first, then real processes."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders

from frontend.admission import STALL_SWEEP_EVERY, ConnectionLimits, Tally, per_ip_connection_cap
from frontend.ingest import SWEEP_EVERY
from frontend.security import FrontendSecurity, listening_origins
from mesh.core.checks import check_comment_text, json_deeper_than
from mesh.config import load_config
from mesh.core.auth import SubscribePolicy, TokenVerifier
from mesh.errors import ClientError, ConfigError
from mesh.core.ratelimit import RateLimit
from mesh.tools.sse_client import SSEClient, SSEError
from mesh.tools.topology import NodeProcess

from helpers import SCHEDULING_MARGIN, Collector, health, http, like, viewer, wait_until, within

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def token(sub="ann", exp_in=60.0, key=SECRET, alg="HS256", aud="livemesh", **claims) -> str:
    now = time.time()
    payload = {"sub": sub, "exp": now + exp_in, "iat": now, "aud": aud, **claims}
    return jwt.encode(payload, key, algorithm=alg)


def auth_header(tok: str) -> dict:
    return {"Authorization": f"Bearer {tok}"}


def code_of(fn, *args, **kw) -> tuple[int, str]:
    with pytest.raises(ClientError) as info:
        fn(*args, **kw)
    return info.value.status, info.value.code


# --- sans-IO: tokens ------------------------------------------------------------------------

def test_hs256_token_checks():
    v = TokenVerifier(SECRET)
    assert v.authorize(token(), "vid", "like").user == "ann"
    assert code_of(v.authorize, None, "vid", "like") == (401, "missing_token")
    assert code_of(v.authorize, token(exp_in=-60), "vid", "like") == (401, "token_expired")
    assert code_of(v.authorize, token(key="x" * 40), "vid", "like") == (401, "invalid_token")
    assert code_of(v.authorize, "not.a.jwt", "vid", "like") == (401, "invalid_token")
    assert code_of(v.authorize, token(aud="other"), "vid", "like") == (401, "invalid_token")
    assert code_of(v.authorize, token(videos=["a-*"]), "vid", "like") == (403, "video_not_allowed")
    assert v.authorize(token(videos=["a-*"]), "a-1", "like").user == "ann"
    assert code_of(v.authorize, token(actions=["like"]), "vid", "comment") == (403, "action_not_allowed")
    unsigned = jwt.encode({"sub": "ann", "exp": time.time() + 60, "aud": "livemesh"}, None, algorithm="none")
    assert code_of(v.authorize, unsigned, "vid", "like") == (401, "invalid_token")
    no_sub = jwt.encode({"exp": time.time() + 60, "aud": "livemesh"}, SECRET, algorithm="HS256")
    assert code_of(v.authorize, no_sub, "vid", "like") == (401, "invalid_token")
    assert code_of(v.authorize, token(sub="a\x07b"), "vid", "like") == (401, "invalid_token")


def test_a_cached_token_still_expires():
    now = [1000.0]
    v = TokenVerifier(SECRET, clock=lambda: now[0], leeway=0)
    tok = token(exp_in=10)  # valid for PyJWT's clock; the cache check uses ours
    grant = v.verify(tok)
    now[0] = grant.exp + 1
    assert code_of(v.verify, tok) == (401, "token_expired")


def _pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_asymmetric_tokens(alg):
    private = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    v = TokenVerifier(public_key_pem=_pem(private.public_key()))
    assert v.algorithms == [alg]
    assert v.authorize(token(key=private, alg=alg), "vid", "comment").user == "ann"
    other = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    assert code_of(v.authorize, token(key=other, alg=alg), "vid", "like") == (401, "invalid_token")
    # alg confusion: an HS256 token "signed" with the public key is refused (no HS256 key here)
    assert code_of(v.authorize, token(key="p" * 40), "vid", "like") == (401, "invalid_token")


def test_subscribe_tokens_are_short_lived_and_subscribe_only():
    v = TokenVerifier(SECRET, subscribe_ttl=300)
    sub_tok = token(aud="livemesh-subscribe", exp_in=120)
    assert v.authorize(sub_tok, "priv-1", "subscribe", subscribe_token=True).user == "ann"
    assert code_of(v.authorize, sub_tok, "priv-1", "like") == (401, "invalid_token")  # wrong aud
    assert code_of(v.authorize, token(), "priv-1", "subscribe", subscribe_token=True) == (401, "invalid_token")
    long_lived = token(aud="livemesh-subscribe", exp_in=3600)
    assert code_of(v.authorize, long_lived, "priv-1", "subscribe", subscribe_token=True) == (401, "invalid_token")


def test_publish_tokens_live_at_most_jwt_max_lifetime():
    v = TokenVerifier(SECRET, max_lifetime=3600)
    assert v.authorize(token(exp_in=3600), "vid", "like").user == "ann"
    assert code_of(v.authorize, token(exp_in=3601), "vid", "like") == (401, "token_lifetime_too_long")
    ten_years = token(exp_in=10 * 365 * 86400)
    assert code_of(v.authorize, ten_years, "vid", "like") == (401, "token_lifetime_too_long")
    # without iat the life left (exp - now) counts
    no_iat = lambda exp_in: jwt.encode({"sub": "ann", "exp": time.time() + exp_in, "aud": "livemesh"},
                                       SECRET, algorithm="HS256")
    assert v.authorize(no_iat(3500), "vid", "like").user == "ann"
    assert code_of(v.authorize, no_iat(7200), "vid", "like") == (401, "token_lifetime_too_long")
    # an old iat with a near exp is a token issued long ago: too long-lived as issued
    now = time.time()
    issued_long_ago = jwt.encode({"sub": "ann", "iat": now - 7200, "exp": now + 60, "aud": "livemesh"},
                                 SECRET, algorithm="HS256")
    assert code_of(v.authorize, issued_long_ago, "vid", "like") == (401, "token_lifetime_too_long")
    assert TokenVerifier(SECRET).max_lifetime == 86400  # the default: one day


def test_an_empty_audience_is_refused():
    for empty in ("", "   "):
        with pytest.raises(ConfigError, match="jwt_audience"):
            TokenVerifier(SECRET, audience=empty)
        with pytest.raises(ConfigError, match="security.jwt_audience: must not be empty"):
            load_config(env={}, overrides={"security.auth": "jwt", "security.jwt_secret": SECRET,
                                           "security.jwt_audience": empty})
    # without JWT auth the audience is unused, and an empty one is no error
    assert load_config(env={}, overrides={"security.jwt_audience": ""}).security.jwt_audience == ""
    cfg = load_config(env={"LIVEMESH_SECURITY_JWT_MAX_LIFETIME": "600"})
    assert cfg.security.jwt_max_lifetime == 600.0
    assert load_config(env={}).security.jwt_max_lifetime == 86400.0


def test_config_errors():
    with pytest.raises(ConfigError):
        TokenVerifier("short")
    with pytest.raises(ConfigError):
        TokenVerifier()
    with pytest.raises(ConfigError):
        TokenVerifier(public_key_pem=b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    assert SubscribePolicy(["priv-*", "team.?"]).is_private("priv-9")
    assert not SubscribePolicy(["priv-*"]).is_private("public")


def test_public_origins_are_checked_and_serialized_as_browsers_send_them():
    cfg = load_config(env={}, overrides={"frontend.public_origins": "HTTPS://Live.Example:443;http://[::1]:8080/"})
    assert cfg.frontend.public_origins == ("https://live.example", "http://[::1]:8080")
    assert load_config(env={}).frontend.public_origins == ()
    for bad, why in (("live.example", "scheme must be http or https"), ("*", "scheme must be http or https"),
                     ("https://live.example/app", "no path"), ("https://u:p@live.example", "no user"),
                     ("https://live.example:99999", "port must be a number"),
                     ("https://live example", "host must be ASCII")):
        with pytest.raises(ConfigError, match=f"frontend.public_origins: '{re.escape(bad)}' is not an "
                                              rf"origin \(scheme://host\[:port\]\): .*{why}"):
            load_config(env={"LIVEMESH_FRONTEND_PUBLIC_ORIGINS": bad})


def test_a_frontend_is_its_own_origin_under_the_addresses_it_listens_on():
    loopback = {"http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"}
    assert listening_origins("127.0.0.1", 8080) == loopback
    assert listening_origins("0.0.0.0", 8080) == loopback  # every address: the page's public one is configured
    assert listening_origins("::1", 8080) == loopback
    assert listening_origins("10.1.2.3", 80) == {"http://10.1.2.3:80"}
    assert listening_origins("Front.Internal", 8080) == {"http://front.internal:8080"}


# --- sans-IO: limits ------------------------------------------------------------------------

def test_token_bucket_refuses_past_the_burst_and_refills():
    limit = RateLimit(rate=2.0, burst=3)
    assert [limit.take("k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limit.take("k", 0.0)
    assert wait == pytest.approx(0.5)
    assert limit.take("k", 0.25) > 0       # not yet
    assert limit.take("k", 0.5) == 0.0     # refilled one
    assert limit.take("other", 0.5) == 0.0  # keys are independent
    assert limit.prune(100.0) == 2 and not limit.buckets
    assert RateLimit(rate=0, burst=1).take("k", 0.0) == 0.0  # disabled


def test_token_bucket_table_is_bounded():
    limit = RateLimit(rate=1.0, burst=1, max_keys=100)
    for i in range(1000):
        limit.take(i, 0.0)
    assert len(limit.buckets) <= 100


def test_connection_caps_count_every_connection_per_address():
    limits = ConnectionLimits(max_connections=3, max_per_ip=2)
    limits.opened("10.0.0.1")
    assert limits.over_ip_cap("10.0.0.1") is None
    limits.opened("10.0.0.1")
    refusal = limits.over_ip_cap("10.0.0.1")
    assert (refusal.status, refusal.code, refusal.retryable) == (429, "too_many_connections", True)
    assert "security.max_connections_per_ip" in refusal.message and not limits.full()
    assert limits.over_ip_cap("10.0.0.2") is None
    limits.opened("10.0.0.2")
    assert limits.full()
    limits.closed("10.0.0.1")
    assert limits.over_ip_cap("10.0.0.1") is None and not limits.full()
    limits.closed("10.0.0.1")
    limits.closed("10.0.0.2")
    assert (limits.total, limits.by_ip) == (0, {})  # nothing left behind per address
    assert per_ip_connection_cap(0, 1000) == 1100 and per_ip_connection_cap(50, 10) == 50
    assert load_config(env={}, overrides={"security.max_connections_per_ip": "1001"}).security.max_connections_per_ip == 1001
    with pytest.raises(ConfigError, match=r"security.max_connections_per_ip: 1000 must be above "
                                          r"security.max_viewers_per_ip \(1000\)"):
        load_config(env={}, overrides={"security.max_connections_per_ip": "1000"})


def test_a_tally_says_when_a_summary_line_is_due():
    now = [0.0]
    tally = Tally(interval=10.0, clock=lambda: now[0])
    assert tally.add() == 1  # the first line at once
    assert [tally.add() for _ in range(3)] == [None] * 3
    now[0] = 10.0
    assert tally.add(2) == 5 and tally.add() is None


def test_the_publish_guards_decide_from_headers_address_and_time_alone():
    """No handler, no socket: each refusal is a ClientError carrying the headers of its answer."""
    cfg = load_config(env={}, overrides={"security.auth": "jwt", "security.jwt_secret": SECRET,
                                         "security.ip_burst": "1", "frontend.public_origins": "https://live.example"})
    stats = collections.defaultdict(int)
    guards = FrontendSecurity(cfg, stats, viewer_count=lambda: 0)
    guards.cors.serve_on("127.0.0.1", 8080)
    page = {"Origin": "https://live.example", "Authorization": f"Bearer {token()}"}
    assert guards.authorize_publish(HTTPHeaders(page), "10.0.0.1", "v", "like", 0.0) == "ann"
    assert guards.authorize_publish(HTTPHeaders({**page, "Origin": "http://127.0.0.1:8080"}),
                                    "10.0.0.2", "v", "like", 0.0) == "ann"

    def refusal(headers: dict, ip: str) -> ClientError:
        with pytest.raises(ClientError) as info:
            guards.authorize_publish(HTTPHeaders(headers), ip, "v", "like", 0.0)
        return info.value

    limited = refusal(page, "10.0.0.1")  # the address's burst of 1 is spent
    assert (limited.status, limited.code, limited.headers) == (429, "rate_limited", {"Retry-After": "1"})
    missing = refusal({"Origin": "https://live.example"}, "10.0.0.3")
    assert (missing.status, missing.headers) == (401, {"WWW-Authenticate": 'Bearer realm="livemesh"'})
    rebound = refusal({**page, "Host": "evil.example", "Origin": "http://evil.example"}, "10.0.0.4")
    assert (rebound.status, rebound.code, rebound.headers) == (403, "origin_not_allowed", {})
    assert (stats["rate_limited"], stats["auth_401"], stats["origin_refused"]) == (1, 1, 1)


def test_json_depth_and_comment_text():
    nested = '{"a": [1, {"b": "[[[[{{{{", "c\\\\": "\\"]]]]"}]}'
    assert json.loads(nested)["a"][1]["c\\"] == '"]]]]'
    assert json_deeper_than(nested, 2) and not json_deeper_than(nested, 3)
    assert json_deeper_than("[" * 50 + "]" * 50, 49) and not json_deeper_than("[" * 50 + "]" * 50, 50)
    assert json_deeper_than("[" * 50, 4)  # never closed: still past the limit
    assert not json_deeper_than("[[]][[]]]]]", 2)  # stray closers: not deep (the parser refuses it)
    for garbage in ('{"unterminated": "[[[', '"' + '\\"' * 100, "]]]][[[", '\\' * 9):
        json_deeper_than(garbage, 2)  # garbage: any answer, never an exception
    check_comment_text("tab\tnew\nline\r\n 🎉")
    for bad in ("bell\x07", "esc\x1b[31m", "nul\x00", "c1\x85", "lone \ud800"):
        with pytest.raises(ClientError) as info:
            check_comment_text(bad)
        assert info.value.code == "invalid_text" and "U+" in info.value.message


# --- processes ------------------------------------------------------------------------------

SECURE = {"security.auth": "jwt", "security.jwt_secret": SECRET, "security.private_videos": "priv-*"}


@pytest.fixture
def secure(topology):
    d = topology.dispatcher("d1")
    f = topology.frontend("f1", **SECURE, **{"security.like_rate": "2", "security.like_burst": "3",
                                             "security.cors_origins": "https://app.example"})
    return d, f


async def test_publish_needs_a_valid_token(secure, tmp_path):
    _, f = secure
    url = f"{f.url}/v1/videos/open-1/likes"
    status, body = await http("POST", url)
    assert status == 401 and body["error"]["code"] == "missing_token"
    assert body["error"]["retryable"] is False
    for tok, code in ((token(exp_in=-30), "token_expired"), (token(key="y" * 40), "invalid_token"),
                      (token(alg="HS512", key=SECRET * 2), "invalid_token"),
                      (token(exp_in=10 * 365 * 86400), "token_lifetime_too_long")):
        status, body = await http("POST", url, headers=auth_header(tok))
        assert (status, body["error"]["code"]) == (401, code), body
    status, body = await http("POST", url, headers=auth_header(token(videos=["other-*"])))
    assert (status, body["error"]["code"]) == (403, "video_not_allowed")
    status, body = await http("POST", f"{f.url}/v1/videos/open-1/comments", {"text": "hi"},
                              headers=auth_header(token(actions=["like"])))
    assert (status, body["error"]["code"]) == (403, "action_not_allowed")
    # a good token: accepted, and its sub replaces the user field of the body
    v = await viewer(f.url, "open-1")
    status, body = await http("POST", f"{f.url}/v1/videos/open-1/comments",
                              {"user": "mallory", "text": "hello"}, headers=auth_header(token(sub="ann")))
    assert status == 202, body
    got = json.loads((await v.events(1))[0].data)
    assert got["user"] == "ann" and got["text"] == "hello"
    v.close()
    stats = (await health(f.url))["stats"]
    assert stats["auth_401"] >= 5 and stats["auth_403"] >= 2


async def test_burst_over_the_limit_gets_429_and_refills(secure):
    _, f = secure
    url = f"{f.url}/v1/videos/rl-1/likes"
    hdr = auth_header(token(sub="bob"))
    for _ in range(3):  # like_burst 3
        assert (await http("POST", url, headers=hdr))[0] == 202
    status, body = await http("POST", url, headers=hdr)
    assert status == 429 and body["error"]["code"] == "rate_limited" and body["error"]["retryable"]
    # other users and other videos have their own buckets
    assert (await http("POST", url, headers=auth_header(token(sub="carol"))))[0] == 202
    assert (await http("POST", f"{f.url}/v1/videos/rl-2/likes", headers=hdr))[0] == 202
    # Retry-After is a whole number of seconds; the bucket refills at 2/s
    resp = await AsyncHTTPClient().fetch(HTTPRequest(url, method="POST", body=b"", headers=hdr),
                                         raise_error=False)
    assert resp.code == 429 and resp.headers["Retry-After"] == "1"
    await wait_until(lambda: _status(http("POST", url, headers=hdr), 202), timeout=3, interval=0.2,
                     what="the bucket refilled")


async def _status(coro, want: int) -> bool:
    return (await coro)[0] == want


async def test_per_ip_limit(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.ip_rate": "1", "security.ip_burst": "2"})
    url = f"{f.url}/v1/videos/ip-1/likes"
    assert [(await http("POST", url, {"user": f"u{i}"}))[0] for i in range(3)] == [202, 202, 429]
    # a flood of rate-limited publishes is counted, and logged once, not line by line
    assert {(await http("POST", url, {"user": "flood"}))[0] for _ in range(40)} == {429}
    stats = (await health(f.url))["stats"]
    assert stats["rate_limited"] == 41
    await http("GET", f.url + "/no/such/route")  # other client errors are still logged each
    await wait_until(lambda: _log_with(f, "404 GET /no/such/route"), what="the 404's access line")
    access_429 = [ln for ln in open(f.log_path, encoding="utf-8").read().splitlines() if " 429" in ln]
    assert len(access_429) == 1 and "rate limited 1 requests" in access_429[0], access_429


async def test_input_limits_say_which_limit(secure):
    _, f = secure
    url = f"{f.url}/v1/videos/in-1/comments"
    hdr = auth_header(token(sub="dan"))
    status, body = await http("POST", url, raw=b'{"text": "' + b"x" * 20000 + b'"}', headers=hdr)
    assert (status, body["error"]["code"]) == (413, "body_too_large") and "16384" in body["error"]["message"]
    status, body = await http("POST", url, raw=b'{"text": "a", "x": [[[[[[1]]]]]]}', headers=hdr)
    assert (status, body["error"]["code"]) == (400, "invalid_json"), body
    assert "more than 4 levels" in body["error"]["message"] and "limit is 4" in body["error"]["message"]
    status, body = await http("POST", url, {"text": "ring\x07ring"}, headers=hdr)
    assert (status, body["error"]["code"]) == (400, "invalid_text") and "U+0007" in body["error"]["message"]
    status, body = await http("POST", url, raw=b'{"text": "half \\ud83d"}', headers=hdr)
    assert (status, body["error"]["code"]) == (400, "invalid_text"), body
    status, body = await http("POST", url, {"text": "x" * 2001}, headers=hdr)
    assert (status, body["error"]["code"]) == (400, "comment_too_long")


def test_json_depth_check_is_linear():
    """The check's cost grows with its input, not with its square: 4x the input costs at most
    ~8x (a quadratic check costs 16x).  Best of several runs, so a busy machine cannot fail it."""
    def cost(body: str) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            json_deeper_than(body, 4)
            best = min(best, time.perf_counter() - start)
        return best

    quarter = 1 << 18
    for unit in ('\\"', "[", '{"[":', '[""],', "[[[[[]]]]]", '"\\\\",'):
        small, large = ("[[[[[[" + unit * (n // len(unit)) for n in (quarter, 4 * quarter))
        assert cost(large) <= 8 * cost(small) + 0.002, unit


async def test_adversarial_megabyte_bodies_do_not_stall_the_loop(topology):
    """Bodies built against the depth check (an unterminated run of escaped quotes, 1 MiB of
    open brackets, objects nested without end, one long string) are refused, each in at most
    20 ms of the frontend's CPU, and ``/healthz`` answers in under 50 ms meanwhile."""
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.max_body_bytes": "1048576"})
    mib = 1 << 20
    bodies = {"escapes": '"' + '\\"' * (mib // 2 - 1), "brackets": "[" * mib,
              "objects": '{"a":' * (mib // 5), "long string": '{"user": "' + "x" * (mib - 13) + '"}'}
    url = f"{f.url}/v1/videos/adv-1/likes"
    sending = True
    probes: list[float] = []

    async def probe() -> None:
        while sending:
            start = time.perf_counter()
            await health(f.url)
            probes.append(time.perf_counter() - start)

    async def refuse_all() -> None:
        for name, body in bodies.items():
            status, answer = await http("POST", url, raw=body.encode())
            assert status == 400, (name, status, answer)

    await health(f.url)
    rounds = 3
    cpu_before = (await health(f.url))["cpu_s"]
    for _ in range(rounds):
        await refuse_all()
    cpu_per_body = ((await health(f.url))["cpu_s"] - cpu_before) / (rounds * len(bodies))
    prober = asyncio.ensure_future(probe())
    try:
        for _ in range(rounds):
            await refuse_all()
    finally:
        sending = False
        await prober
    print(f"cpu per refused 1 MiB body {cpu_per_body * 1000:.1f} ms; /healthz max "
          f"{max(probes) * 1000:.1f} ms over {len(probes)} probes")
    assert len(probes) >= 3
    assert cpu_per_body <= 0.020
    assert max(probes) < 0.050
    assert (await like(f.url, "adv-1"))["video"] == "adv-1"  # and it still publishes


async def test_private_videos_need_a_token_to_watch(secure):
    _, f = secure
    with pytest.raises(SSEError) as info:
        await viewer(f.url, "priv-1")
    assert info.value.status == 401 and json.loads(info.value.body)["error"]["code"] == "missing_token"
    # EventSource: a short-lived subscribe token in the query string
    sub_tok = token(sub="eve", aud="livemesh-subscribe", exp_in=60, videos=["priv-1"])
    v = await _viewer_url(f"{f.url}/v1/videos/priv-1/events?access_token={sub_tok}")
    status, _ = await http("POST", f"{f.url}/v1/videos/priv-1/likes", headers=auth_header(token()))
    assert status == 202
    assert (await v.events(1))[0].event == "like"
    v.close()
    # a publish token does not work in the query string; a subscribe token for another video
    # is refused; a header token works
    for tok, want in ((token(), 401), (token(aud="livemesh-subscribe", videos=["priv-2"]), 403)):
        with pytest.raises(SSEError) as info:
            await _viewer_url(f"{f.url}/v1/videos/priv-1/events?access_token={tok}")
        assert info.value.status == want
    (await viewer(f.url, "priv-1", headers=auth_header(token()))).close()
    # public videos stay anonymous
    (await viewer(f.url, "open-2")).close()
    # the query token never reaches the log (Tornado logs the URI of every 4xx)
    expired = token(aud="livemesh-subscribe", exp_in=-60)
    with pytest.raises(SSEError):
        await _viewer_url(f"{f.url}/v1/videos/priv-1/events?access_token={expired}")
    log_text = await wait_until(lambda: _log_with(f, "priv-1/events?access_token=REDACTED"),
                                what="the 401 in the access log")
    assert expired not in log_text and sub_tok not in log_text


async def test_subscribe_tokens_never_reach_the_log_on_any_route_or_status(secure):
    """Every request is redacted before any line about it is logged: a bad video (400), a
    route that does not exist (404), a publish (401), the name percent-encoded in either
    case, a value that is not UTF-8; a valid token so spelled still opens the stream."""
    _, f = secure
    secrets = {name: f"SECRET{name}x{i}" for i, name in enumerate(("bad", "route", "publish", "enc", "utf8"))}
    cases = [  # (request, its status, the access line that must appear)
        ("GET", f"/v1/videos/-bad/events?access_token={secrets['bad']}", 400,
         "400 GET /v1/videos/-bad/events?access_token=REDACTED"),
        ("GET", f"/no/such/route?x=1&access_token={secrets['route']}", 404,
         "404 GET /no/such/route?x=1&access_token=REDACTED"),
        ("POST", f"/v1/videos/open-9/likes?access_token={secrets['publish']}", 401,
         "401 POST /v1/videos/open-9/likes?access_token=REDACTED"),
        ("GET", f"/v1/videos/priv-1/events?access%5Ftoken={secrets['enc']}", 401,
         "401 GET /v1/videos/priv-1/events?access%5Ftoken=REDACTED"),
        ("GET", f"/v1/videos/priv-1/events?%61ccess_token=%ff%fe{secrets['utf8']}", 401,
         "401 GET /v1/videos/priv-1/events?%61ccess_token=REDACTED"),
    ]
    for method, path, status, line in cases:
        assert (await http(method, f.url + path))[0] == status, path
        await wait_until(lambda: _log_with(f, line), what=line)
    valid = token(sub="gil", aud="livemesh-subscribe", exp_in=60, videos=["priv-1"])
    v = await _viewer_url(f"{f.url}/v1/videos/priv-1/events?access%5ftoken={valid}")
    assert (await http("POST", f"{f.url}/v1/videos/priv-1/likes", headers=auth_header(token())))[0] == 202
    assert (await v.events(1))[0].event == "like"
    v.close()
    await http("GET", f.url + "/marker/after/the/valid/token")  # logged after everything above
    text = await wait_until(lambda: _log_with(f, "404 GET /marker/after/the/valid/token"), what="the marker")
    for secret in [*secrets.values(), valid]:
        assert secret not in text


async def _viewer_url(url: str):
    return await SSEClient(url).connect()


def _log_with(node: NodeProcess, needle: str) -> str | None:
    with open(node.log_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return text if needle in text else None


async def test_cors_only_configured_origins_publish(secure):
    _, f = secure
    url = f"{f.url}/v1/videos/cors-1/likes"
    hdr = auth_header(token(sub="fay"))
    client = AsyncHTTPClient()

    async def fetch(method, headers, body=None):
        return await client.fetch(HTTPRequest(url, method=method, headers=headers, body=body,
                                              allow_nonstandard_methods=True), raise_error=False)

    pre = await fetch("OPTIONS", {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                  "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert "Origin" in pre.headers.get("Vary", "")
    assert (await fetch("OPTIONS", {"Origin": "https://evil.example"})).code == 403
    ok = await fetch("POST", {**hdr, "Origin": "https://app.example"}, b"")
    assert ok.code == 202 and ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    bad = await fetch("POST", {**hdr, "Origin": "https://evil.example"}, b"")
    assert bad.code == 403 and json.loads(bad.body)["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in bad.headers
    same = await fetch("POST", {**hdr, "Origin": f.url}, b"")  # the frontend's own page
    assert same.code == 202
    # an error to an allowed origin still carries CORS headers (the page can read it)
    err = await fetch("POST", {"Origin": "https://app.example"}, b"")
    assert err.code == 401 and err.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert err.headers["WWW-Authenticate"].startswith("Bearer")


async def _publish_as(url: str, host: str, origin: str, chunked: bool) -> tuple[int, dict]:
    """A like sent with these ``Host`` and ``Origin`` fields, on the fast path or (``chunked``)
    handed to Tornado; its status and JSON body."""
    from test_ingest import answer, connect, post
    reader, writer = await connect(url)
    try:
        request = post("so-1", headers=[("Origin", origin)], chunked=chunked)
        writer.write(request.replace(b"Host: 127.0.0.1\r\n", f"Host: {host}\r\n".encode(), 1))
        status, _, body = await answer(reader)
        return status, body
    finally:
        writer.close()


async def test_same_origin_is_the_configured_origins_never_the_host_header(topology):
    """A DNS-rebinding page (``http://evil.example`` resolving to the frontend) sends a ``Host``
    that matches its ``Origin``: refused on both request paths.  The page served from the
    frontend's own address, or from a configured public origin (a balancer's), publishes."""
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.public_origins": "https://Live.Example"})
    own = f.url.removeprefix("http://")
    for chunked in (False, True):
        status, body = await _publish_as(f.url, "evil.example", "http://evil.example", chunked)
        assert (status, body["error"]["code"]) == (403, "origin_not_allowed"), (chunked, body)
        assert "frontend.public_origins" in body["error"]["message"] and body["error"]["retryable"] is False
        status, body = await _publish_as(f.url, f"evil.example:{own.split(':')[1]}",
                                         f"http://evil.example:{own.split(':')[1]}", chunked)
        assert status == 403, (chunked, body)
        for host, origin in ((own, f.url), (f"localhost:{own.split(':')[1]}", f.url.replace("127.0.0.1", "localhost")),
                             ("live.example", "https://live.example"), (own, "https://live.example")):
            status, body = await _publish_as(f.url, host, origin, chunked)
            assert status == 202, (chunked, host, origin, body)
        status, body = await _publish_as(f.url, "live.example:8443", "https://live.example:8443", chunked)
        assert status == 403, (chunked, body)
    preflight = {"Access-Control-Request-Method": "POST"}
    status, _ = await http("OPTIONS", f"{f.url}/v1/videos/so-1/likes",
                           headers={**preflight, "Host": "evil.example", "Origin": "http://evil.example"})
    assert status == 403
    status, _ = await http("OPTIONS", f"{f.url}/v1/videos/so-1/likes",
                           headers={**preflight, "Origin": "https://live.example"})
    assert status == 204
    assert (await health(f.url))["stats"]["origin_refused"] == 7


async def test_cors_wildcard_never_for_credentialed_requests(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.cors_origins": "*", "security.cors_credentials": "true"})
    url = f"{f.url}/v1/videos/cw-1/likes"
    client = AsyncHTTPClient()
    plain = await client.fetch(HTTPRequest(url, method="POST", body=b"", headers={"Origin": "https://a.example"}),
                               raise_error=False)
    assert plain.code == 202 and plain.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in plain.headers
    cred = await client.fetch(HTTPRequest(url, method="POST", body=b"",
                                          headers={"Origin": "https://a.example", "Cookie": "s=1"}),
                              raise_error=False)
    assert cred.code == 403 and "Access-Control-Allow-Origin" not in cred.headers


# --- connections --------------------------------------------------------------------------------

def _raw_get(host: str, port: int, path: str, source: str | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5, source_address=(source, 0) if source else None)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


def _status_line(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


async def test_viewer_limits_per_ip_and_per_frontend_and_health_at_max(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.max_viewers": "3", "security.max_viewers_per_ip": "2"})
    host, port = f.url.removeprefix("http://").split(":")
    port = int(port)
    loop = asyncio.get_running_loop()
    mine = [await viewer(f.url, "cap") for _ in range(2)]
    with pytest.raises(SSEError) as info:
        await viewer(f.url, "cap")
    assert info.value.status == 429 and json.loads(info.value.body)["error"]["code"] == "too_many_streams"
    third = await loop.run_in_executor(None, _raw_get, host, port, "/v1/videos/cap/events", "127.0.0.2")
    assert await loop.run_in_executor(None, _status_line, third) == 200
    fourth = await loop.run_in_executor(None, _raw_get, host, port, "/v1/videos/cap/events", "127.0.0.3")
    assert await loop.run_in_executor(None, _status_line, fourth) == 503
    h = await health(f.url)  # at the maximum, the health check still answers
    assert h["connections"] == 3 and h["stats"]["viewers_refused_full"] == 1
    assert h["stats"]["viewers_refused_ip"] == 1
    # a closed stream frees its place
    mine.pop().close()
    await wait_until(lambda: _connections(f.url, 2), what="stream closed")
    (await viewer(f.url, "cap")).close()
    for s in (third, fourth):
        s.close()
    for v in mine:
        v.close()


async def _connections(url: str, n: int) -> bool:
    return (await health(url))["connections"] == n


def _slowloris(host: str, port: int, step: float, give_up: float) -> float:
    """Send a request's headers one byte per ``step`` seconds; seconds until the server cut us."""
    request = f"GET /v1/videos/slow/events HTTP/1.1\r\nHost: {host}\r\nX-Padding: {'a' * 200}\r\n\r\n".encode()
    start = time.monotonic()  # before the connection exists: the server's clock starts later
    sock = socket.create_connection((host, port), timeout=give_up)
    try:
        for i in range(len(request) - 4):  # never finish the header block
            try:
                sock.sendall(request[i:i + 1])
            except OSError:
                return time.monotonic() - start
            sock.settimeout(step)
            try:
                if sock.recv(1) == b"":
                    return time.monotonic() - start
            except socket.timeout:
                pass
            except OSError:
                return time.monotonic() - start
            if time.monotonic() - start > give_up:
                break
        return float("inf")
    finally:
        sock.close()


def _idle(host: str, port: int, give_up: float) -> float:
    start = time.monotonic()  # before the connection exists: the server's clock starts later
    sock = socket.create_connection((host, port), timeout=give_up)
    try:
        sock.recv(1)
    except OSError:
        pass
    finally:
        sock.close()
    return time.monotonic() - start


#: the frontend's security.header_timeout in the slowloris test
HEADER_TIMEOUT = 1.5


async def test_slowloris_is_cut_after_the_header_timeout_while_viewers_receive(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.header_timeout": str(HEADER_TIMEOUT)})
    host, port = f.url.removeprefix("http://").split(":")
    port = int(port)
    fast = Collector(await viewer(f.url, "slow"))
    loop = asyncio.get_running_loop()
    slow = [loop.run_in_executor(None, _slowloris, host, port, 0.2, 10.0) for _ in range(3)]
    idle = loop.run_in_executor(None, _idle, host, port, 10.0)
    sent = []
    while not all(s.done() for s in slow):  # viewers keep receiving meanwhile
        sent.append((await like(f.url, "slow"))["id"])
        await asyncio.sleep(0.1)
    cut_after = [await s for s in slow]
    # never before the timeout (both clocks start before the connection, so no delay can
    # break this); at most one sweep after it, plus the slowloris' own step in noticing
    idle_after = await idle
    for took in [*cut_after, idle_after]:
        assert took > HEADER_TIMEOUT, (cut_after, idle_after)
        within(took, HEADER_TIMEOUT + SWEEP_EVERY + 0.2, "cutting a connection that sends no whole header")
    await wait_until(lambda: fast.ids() == sent, what="the viewer got every like")
    assert not fast.closed  # a streaming response is not cut by the header timeout
    await fast.close()
    print(f"slowloris cut after {cut_after} s (header_timeout 1.5 s)")


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict | None]:
    """Send ``request``, read one answer: its status and JSON body (0, None: closed unanswered)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0, None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), json.loads(body)


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _connect_from(host: str, port: int, source: str) -> socket.socket:
    return socket.create_connection((host, port), timeout=5, source_address=(source, 0))


async def test_every_kind_of_connection_counts_against_the_per_address_cap(topology):
    """``security.max_connections_per_ip`` counts streams, idle keep-alive connections on the
    publish fast path and Tornado's connections alike; one more gets a JSON 429 and is closed,
    other addresses are not affected, and a closed connection frees its place."""
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.max_viewers_per_ip": "2", "security.max_connections_per_ip": "4",
                                   "security.header_timeout": "60"})
    host, port = f.url.removeprefix("http://").split(":")
    port = int(port)
    loop = asyncio.get_running_loop()
    run = lambda fn, *args: loop.run_in_executor(None, fn, *args)  # noqa: E731
    held = []
    try:
        for _ in range(2):  # two streams
            held.append(await run(_raw_get, host, port, "/v1/videos/cap-ip/events", "127.0.0.7"))
            assert await run(_status_line, held[-1]) == 200
        held.append(await run(_connect_from, host, port, "127.0.0.7"))  # idle, on the fast path
        tornado_conn = await run(_connect_from, host, port, "127.0.0.7")  # kept alive by Tornado
        held.append(tornado_conn)
        assert (await run(_exchange, tornado_conn, HEALTH))[0] == 200
        fifth = await run(_connect_from, host, port, "127.0.0.7")
        status, body = await run(_exchange, fifth, HEALTH)
        assert (status, body["error"]["code"], body["error"]["retryable"]) == (429, "too_many_connections", True), body
        assert "4 open connections; the limit is 4" in body["error"]["message"]
        assert await run(fifth.recv, 1) == b""  # and closed
        fifth.close()
        other = await run(_connect_from, host, port, "127.0.0.8")
        assert (await run(_exchange, other, HEALTH))[0] == 200
        other.close()
        assert (await run(_exchange, tornado_conn, HEALTH))[0] == 200  # the held ones still work
        held.pop(2).close()  # the idle one goes: its place is free again

        async def one_more_is_taken() -> bool:
            sock = await run(_connect_from, host, port, "127.0.0.7")
            try:
                return (await run(_exchange, sock, HEALTH))[0] == 200
            finally:
                sock.close()

        await wait_until(one_more_is_taken, what="a closed connection frees its place")
        assert (await health(f.url))["stats"]["connections_refused_ip"] >= 1
    finally:
        for sock in held:
            sock.close()



def _pipeline_without_reading(host: str, port: int, request: bytes, most: int, give_up: float) -> tuple[float, float]:
    """Send up to ``most`` pipelined copies of ``request`` and never read an answer; the server
    stops taking requests once its answers have nowhere to go.  Returns (seconds from connecting
    to being cut, seconds from the last request the server took to being cut); inf: not cut."""
    import select
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the answers back up soon
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.connect((host, port))
        connected = last_progress = time.monotonic()
        sock.setblocking(False)
        pending, sent_requests = b"", 0
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)  # POLLHUP and POLLERR are always reported
        while time.monotonic() - connected < give_up:
            if not pending and sent_requests < most:
                pending, sent_requests = request * 50, sent_requests + 50
            try:
                sent = sock.send(pending) if pending else 0
            except BlockingIOError:
                sent = 0
            except OSError:
                now = time.monotonic()
                return now - connected, now - last_progress
            if sent:
                pending, last_progress = pending[sent:], time.monotonic()
                continue
            if poller.poll(50):
                now = time.monotonic()
                return now - connected, now - last_progress
        return float("inf"), float("inf")
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["fast", "tornado"])
async def test_a_connection_that_never_reads_its_answers_is_cut_after_the_header_timeout(topology, path):
    """Pipelined likes (the publish fast path) or page requests (Tornado) from a client that
    never reads: the answers back up, the connection stays busy, and it is cut
    ``security.header_timeout`` after its client last read, while viewers keep receiving."""
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.header_timeout": "1.5", "security.ip_rate": "0"})
    host, port = f.url.removeprefix("http://").split(":")
    fast = Collector(await viewer(f.url, "unread"))
    request = (b"POST /v1/videos/unread-flood/likes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
               if path == "fast" else b"GET /static/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    loop = asyncio.get_running_loop()
    cut = loop.run_in_executor(None, _pipeline_without_reading, host, int(port), request, 20000, 20.0)
    sent = []
    while not cut.done():
        sent.append((await like(f.url, "unread"))["id"])
        await asyncio.sleep(0.1)
    since_connect, since_taken = await cut
    assert since_connect >= 1.5, since_connect  # its first answers went out: not cut before the deadline
    assert since_taken <= 1.5 + STALL_SWEEP_EVERY + SCHEDULING_MARGIN, (since_connect, since_taken)
    assert (await health(f.url))["stats"]["connections_cut_unread"] == 1
    await wait_until(lambda: fast.ids() == sent, what="the viewer got every like")
    await fast.close()
    print(f"{path}: cut {since_connect:.2f} s after connecting, {since_taken:.2f} s after the last request taken")


# --- the open-file limit ------------------------------------------------------------------------

NOFILE = 300


class LimitedNode(NodeProcess):
    """A node process started with a lowered open-file limit."""

    def start(self) -> "LimitedNode":
        stderr = open(self.log_path, "ab") if self.log_path else None

        def lower_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

        self.proc = subprocess.Popen([sys.executable, "-m", self.role, *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                     preexec_fn=lower_limit)
        if stderr:
            stderr.close()
        return self


def _limited_frontend(topology, name: str, **settings) -> LimitedNode:
    merged = {**topology.extra, "frontend.port": 0, "frontend.host": topology.host,
              "security.header_timeout": "60", **settings}
    args = [a for k, v in merged.items() for a in ("--set", f"{k}={v}")] + ["--set", f"node.name={name}"]
    node = LimitedNode("frontend", name, args, topology._env(), os.path.join(topology.log_dir, f"{name}.log"))
    topology.nodes.append(node.start())
    node.wait_ready()
    return node


def _flood(host: str, port: int, n: int, settle: float = 2.0) -> tuple[list[socket.socket], dict]:
    """Open ``n`` connections that send nothing; classify how the server treats each within
    ``settle`` seconds: still open (accepted, waiting for headers), answered 503, or closed."""
    import selectors
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
    outcome = {"held": 0, "shed_503": 0, "closed": 0}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    pending = set(socks)
    deadline = time.monotonic() + settle
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            outcome["shed_503" if data.startswith(b"HTTP/1.1 503") else "closed"] += 1
            sel.unregister(s)
            pending.discard(s)
    outcome["held"] = len(pending)
    sel.close()
    return socks, outcome


@pytest.mark.parametrize("fd_reserve", ["0", "100"])
async def test_connections_past_the_open_file_limit_are_shed_quietly(topology, fd_reserve):
    """fd_reserve 0: the frontend meets EMFILE itself (the reserve-descriptor trick sheds);
    fd_reserve 100: it sheds at NOFILE - 100 before EMFILE can happen."""
    topology.dispatcher("d1")
    other = topology.frontend("f2")
    f = _limited_frontend(topology, "f1", **{"security.fd_reserve": fd_reserve})
    host, port = f.url.removeprefix("http://").split(":")
    port = int(port)
    cols = [Collector(await viewer(f.url, "full")) for _ in range(5)]
    log_lines_before = _count_lines(f.log_path)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    socks, outcome = await loop.run_in_executor(None, _flood, host, port, NOFILE + 200)
    flood_s = time.monotonic() - started
    assert outcome["shed_503"] + outcome["closed"] >= 200, outcome  # refused, not left hanging
    assert outcome["held"] <= NOFILE, outcome
    # existing viewers keep receiving (the like goes through the other frontend)
    sent = [(await like(other.url, "full"))["id"] for _ in range(3)]
    for c in cols:
        await wait_until(lambda: c.ids() == sent, what="a viewer of the full frontend got the likes")
    for s in socks:
        s.close()
    h = await wait_until(lambda: _health_or_none(f.url), timeout=10, what="health after the flood")
    assert h["stats"]["connections_shed"] >= 200 and h["connections"] == 5
    new_lines = _count_lines(f.log_path) - log_lines_before
    text = open(f.log_path, encoding="utf-8", errors="replace").read()
    assert new_lines <= 6, text[-3000:]
    assert "Traceback" not in text and "Error in connection callback" not in text
    assert re.search(r"shed \d+ new connections", text)
    for c in cols:
        await c.close()
    print(f"fd_reserve={fd_reserve}: {outcome} in {flood_s:.2f}s, {new_lines} new log lines")


async def _health_or_none(url: str):
    try:
        status, body = await http("GET", f"{url}/healthz", timeout=2)
    except OSError:
        return None
    return body if status == 200 else None


def _count_lines(path: str) -> int:
    with open(path, "rb") as fh:
        return fh.read().count(b"\n")
