"""The publish checks (``mesh.core.checks``) as pure functions: a request in, an event or a
ClientError with its status, code and header fields out; no server, socket or handler."""

from __future__ import annotations

import time
from collections import defaultdict

import jwt
import pytest
from tornado.httputil import HTTPHeaders

from frontend.ingest import Headers
from frontend.security import FrontendSecurity
from mesh.config import load_config
from mesh.core.auth import TokenVerifier
from mesh.core.checks import PublishRequest, invalid_char, valid_user
from mesh.errors import ClientError

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def _checks(**overrides):
    stats = defaultdict(int)
    cfg = load_config(env={}, overrides=overrides)
    return FrontendSecurity(cfg, stats, lambda: 0).publish_checks(), stats


def _request(body: bytes = b"", peer: str = "10.0.0.1", now: float = 100.0, **fields) -> PublishRequest:
    headers = HTTPHeaders({name.replace("_", "-"): value for name, value in fields.items()})
    return PublishRequest("POST", "/v1/videos/v/likes", headers, body, peer, now)


def _refusal(checks, req, video="v", kind="like") -> ClientError:
    with pytest.raises(ClientError) as info:
        checks.event(req, video, kind)
    return info.value


def _token(sub="ann", **claims) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "exp": now + 60, "iat": now, "aud": "livemesh", **claims}, SECRET,
                      algorithm="HS256")


def test_a_like_and_a_comment_become_events():
    checks, _ = _checks()
    like = checks.event(_request(b'{"user": "ann"}'), "v", "like")
    assert (like["video"], like["kind"], like["user"]) == ("v", "like", "ann")
    assert checks.event(_request(), "v", "like")["user"] is None  # an empty like is anonymous
    comment = checks.event(_request('{"text": "tab\\there\\nnext line 🎉"}'.encode()), "v", "comment")
    assert comment["text"] == "tab\there\nnext line 🎉"


def test_each_refusal_has_its_status_code_and_header_fields():
    checks, _ = _checks(**{"frontend.max_body_bytes": 64, "frontend.max_comment_chars": 5})
    cases = [
        (_request(b"x" * 65), "v", "like", 413, "body_too_large"),
        (_request(b"\xff"), "v", "like", 400, "invalid_encoding"),
        (_request(b"[[[[[[]]]]]]"), "v", "like", 400, "invalid_json"),
        (_request(b"[1]"), "v", "like", 400, "invalid_body"),
        (_request(b'{"user": 5}'), "v", "like", 400, "invalid_user"),
        (_request(b'{"user": "a\\u0000b"}'), "v", "like", 400, "invalid_user"),
        (_request(b'{"user": "tab\\tname"}'), "v", "like", 400, "invalid_user"),
        (_request(b""), "v", "comment", 400, "missing_body"),
        (_request(b'{"text": 1}'), "v", "comment", 400, "missing_text"),
        (_request(b'{"text": "  "}'), "v", "comment", 400, "empty_comment"),
        (_request(b'{"text": "toolong"}'), "v", "comment", 400, "comment_too_long"),
        (_request(b'{"text": "a\\u0007"}'), "v", "comment", 400, "invalid_text"),
        (_request(b'{"text": "\\ud800"}'), "v", "comment", 400, "invalid_text"),
        (_request(), "-bad", "like", 400, "invalid_video"),
        (_request(Origin="http://evil.example"), "v", "like", 403, "origin_not_allowed"),
    ]
    for req, video, kind, status, code in cases:
        err = _refusal(checks, req, video, kind)
        assert (err.status, err.code, err.headers) == (status, code, {}), (req.body, err.message)
    wrong = PublishRequest("GET", "/v1/videos/v/likes?x=1", HTTPHeaders(), b"", "10.0.0.1", 0.0)
    err = _refusal(checks, wrong)
    assert (err.status, err.code, err.message) == (405, "method_not_allowed", "GET is not allowed on /v1/videos/v/likes")


def test_the_ip_limit_comes_first_and_tells_when_to_retry():
    checks, stats = _checks(**{"security.ip_rate": 1.0, "security.ip_burst": 2, "security.auth": "jwt",
                               "security.jwt_secret": SECRET})
    bad_token = {"Authorization": "Bearer not.a.jwt"}
    assert _refusal(checks, _request(**bad_token)).status == 401
    assert _refusal(checks, _request(**bad_token)).status == 401
    limited = _refusal(checks, _request(**bad_token))  # the bucket is empty: no signature check
    assert (limited.status, limited.code, limited.headers) == (429, "rate_limited", {"Retry-After": "1"})
    assert (stats["rate_limited"], stats["auth_401"]) == (1, 2)
    other = checks.event(_request(peer="10.0.0.2", Authorization=f"Bearer {_token()}"), "v", "like")
    assert other["user"] == "ann"
    later = _request(now=101.0, Authorization=f"Bearer {_token()}")  # one token back after 1 s
    assert checks.event(later, "v", "like")["user"] == "ann"


def test_the_token_decides_the_user_and_its_own_limit():
    checks, stats = _checks(**{"security.auth": "jwt", "security.jwt_secret": SECRET,
                               "security.like_rate": 0.5, "security.like_burst": 1})
    missing = _refusal(checks, _request())
    assert (missing.status, missing.code, missing.headers) == \
        (401, "missing_token", {"WWW-Authenticate": 'Bearer realm="livemesh"'})
    invalid = _refusal(checks, _request(Authorization="Bearer not.a.jwt"))
    assert invalid.headers == {"WWW-Authenticate": 'Bearer realm="livemesh", error="invalid_token"'}
    other_video = _refusal(checks, _request(Authorization=f"Bearer {_token(videos=['a-*'])}"))
    assert (other_video.status, other_video.code, other_video.headers) == (403, "video_not_allowed", {})
    signed = {"Authorization": f"Bearer {_token('bob')}"}
    assert checks.event(_request(b'{"user": "mallory"}', **signed), "v", "like")["user"] == "bob"
    again = _refusal(checks, _request(**signed))
    assert (again.status, again.code, again.headers) == (429, "rate_limited", {"Retry-After": "2"})
    assert "by bob on v" in again.message
    assert checks.event(_request(**signed), "w", "like")["user"] == "bob"  # per user per video
    assert (stats["auth_401"], stats["auth_403"], stats["rate_limited"]) == (2, 1, 1)


def test_the_fast_paths_fields_read_as_tornados():
    """The checks read header fields with any letter case, from Tornado's ``HTTPHeaders`` or
    the fast path's ``Headers`` alike, and refuse them the same way."""
    checks, _ = _checks()
    tornado_fields = _request(Origin="http://evil.example").headers
    fast_fields = Headers({"origin": "http://evil.example"})
    errors = [_refusal(checks, PublishRequest("POST", "/v1/videos/v/likes", fields, b"", "10.0.0.1", 1.0))
              for fields in (tornado_fields, fast_fields)]
    assert [(e.status, e.code, e.message) for e in errors] == [(403, "origin_not_allowed", errors[0].message)] * 2


def test_one_character_check_serves_users_tokens_and_text():
    assert invalid_char("plain name") == -1 and invalid_char("a\tb") == 1
    assert invalid_char("a\tb\r\n", line_breaks=True) == -1
    for bad in ("\x00", "\x1b", "\x7f", "\x85", "\ud800"):
        assert invalid_char(f"ab{bad}", line_breaks=True) == 2
        assert not valid_user(f"ab{bad}")
    assert valid_user("x" * 64) and not valid_user("x" * 65) and not valid_user("") and not valid_user(5)
    with pytest.raises(ClientError) as info:  # a token's sub passes the same check
        TokenVerifier(SECRET).authorize(_token("a\tb"), "v", "like")
    assert (info.value.status, info.value.code) == (401, "invalid_token")
