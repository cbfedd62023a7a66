"""Who may publish and who may watch: JWT verification and the per-video subscribe policy.

Theory of operation.  Sans-IO: ``TokenVerifier.authorize`` takes a token string, the video and
the action and returns a ``Grant`` (the user) or raises ``ClientError`` (401: no token, a token
that does not verify, an expired one; 403: a valid token that does not cover this video or
action).  The frontend's HTTP adapter (``frontend.security``) finds the token and maps the
error to a response; nothing here touches sockets.

Tokens are JWTs (RFC 7519) verified with PyJWT.  Keys come from config, and each key fixes the
one algorithm it is used with, so a token cannot pick its own verification (the classic
"alg confusion": an RSA public key used as an HMAC secret, or ``alg: none``):

* ``security.jwt_secret``     -> HS256 (a shared secret, at least 32 bytes)
* ``security.jwt_public_key`` -> RS256 (RSA PEM) or ES256 / ES384 (EC P-256 / P-384 PEM)

Claims: ``sub`` (required) is the user and replaces any ``user`` field of a publish body;
``exp`` (required) is enforced with ``jwt_leeway`` seconds of clock skew; ``aud`` must be
``jwt_audience`` (``jwt_audience + "-subscribe"`` for subscribe tokens, below); ``iss`` must be
``jwt_issuer`` when one is configured.  The audience is never empty (refused at config load), so
a token minted for another service never passes.  A publish token lives at most
``jwt_max_lifetime`` seconds: ``exp - iat``, or ``exp - now`` when it carries no ``iat``, so a
leaked token is useless after a day however its issuer set ``exp``.  Optional restrictions: ``videos`` (a list of video ids
or glob patterns such as ``"launch-*"``) and ``actions`` (a subset of ``like``, ``comment``,
``subscribe``); a token without them may do anything on any video.

EventSource cannot send an ``Authorization`` header, so a browser watching a private video puts
a *subscribe token* in the query string (``?access_token=``).  Query strings leak (proxy logs,
history), so such a token is accepted for subscribing only: its audience is
``jwt_audience + "-subscribe"`` (a publish token is refused there and vice versa), it must carry
``iat`` and live at most ``subscribe_token_ttl`` seconds, and the frontend redacts it from
the request URI before anything can log it.

Verified tokens are cached (bounded, until their ``exp``): ES256 verification costs ~0.1 ms,
and a viewer tapping like sends the same token many times.
"""

from __future__ import annotations

import fnmatch
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from mesh.core.checks import valid_user
from mesh.errors import ClientError, ConfigError
from mesh.wire.protocol import USER_MAX

ACTION_LIKE = "like"
ACTION_COMMENT = "comment"
ACTION_SUBSCRIBE = "subscribe"
ACTIONS = frozenset({ACTION_LIKE, ACTION_COMMENT, ACTION_SUBSCRIBE})

#: the audience suffix of subscribe tokens (query-string tokens for EventSource)
SUBSCRIBE_AUDIENCE_SUFFIX = "-subscribe"
MIN_SECRET_BYTES = 32
CACHE_SIZE = 10000


@dataclass(frozen=True)
class Grant:
    """What a verified token allows: who, which videos (None: all), which actions."""

    user: str
    videos: tuple[str, ...] | None
    actions: frozenset[str]
    exp: float

    def allows_video(self, video: str) -> bool:
        return self.videos is None or any(fnmatch.fnmatchcase(video, p) for p in self.videos)


def unauthorized(code: str, message: str) -> ClientError:
    return ClientError(401, code, message)


class TokenVerifier:
    def __init__(self, secret: str = "", public_key_pem: bytes | None = None,
                 audience: str = "livemesh", issuer: str = "", leeway: float = 5.0,
                 subscribe_ttl: float = 300.0, max_lifetime: float = 86400.0, clock=time.time):
        self.keys: dict[str, object] = {}
        if secret:
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"security.jwt_secret: HS256 needs at least {MIN_SECRET_BYTES} bytes")
            self.keys["HS256"] = secret.encode()
        if public_key_pem:
            for alg in _algorithms_of(public_key_pem):
                self.keys[alg] = load_pem_public_key(public_key_pem)
        if not self.keys:
            raise ConfigError("security.auth = jwt needs security.jwt_secret or security.jwt_public_key")
        if not audience or not audience.strip():
            raise ConfigError("security.jwt_audience must not be empty: without an audience a token "
                              "minted for another service, or a subscribe token, would be accepted")
        self.audience = audience
        self.max_lifetime = max_lifetime
        self.issuer = issuer or None
        self.leeway = leeway
        self.subscribe_ttl = subscribe_ttl
        self.clock = clock
        self._cache: OrderedDict[tuple[str, bool], Grant] = OrderedDict()

    @property
    def algorithms(self) -> list[str]:
        return sorted(self.keys)

    def verify(self, token: str, subscribe_token: bool = False) -> Grant:
        """Check signature, expiry, audience and issuer; raises ClientError(401)."""
        now = self.clock()
        key = (token, subscribe_token)
        grant = self._cache.get(key)
        if grant is not None:
            if grant.exp + self.leeway < now:
                del self._cache[key]
                raise unauthorized("token_expired", "the token has expired")
            return grant
        grant = self._decode(token, subscribe_token, now)
        self._cache[key] = grant
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grant

    def authorize(self, token: str | None, video: str, action: str,
                  subscribe_token: bool = False) -> Grant:
        """The grant of ``token`` for ``action`` on ``video``; ClientError 401 or 403."""
        if not token:
            raise unauthorized("missing_token", "this request needs a bearer token "
                               "(Authorization: Bearer <JWT>)")
        grant = self.verify(token, subscribe_token)
        if action not in grant.actions:
            raise ClientError(403, "action_not_allowed", f"the token does not allow '{action}'")
        if not grant.allows_video(video):
            raise ClientError(403, "video_not_allowed", f"the token does not cover video {video!r}")
        return grant

    def _decode(self, token: str, subscribe_token: bool, now: float) -> Grant:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as exc:
            raise unauthorized("invalid_token", f"malformed token: {exc}") from None
        key = self.keys.get(alg) if isinstance(alg, str) else None
        if key is None:
            raise unauthorized("invalid_token", f"token algorithm {str(alg)[:16]!r} is not accepted "
                               f"(accepted: {', '.join(self.algorithms)})")
        audience = self.audience + SUBSCRIBE_AUDIENCE_SUFFIX if subscribe_token else self.audience
        required = ["exp", "sub"] + (["iat"] if subscribe_token else [])
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=audience,
                                issuer=self.issuer, leeway=self.leeway,
                                options={"require": required})
        except jwt.ExpiredSignatureError:
            raise unauthorized("token_expired", "the token has expired") from None
        except jwt.InvalidSignatureError:
            raise unauthorized("invalid_token", "the token signature does not verify") from None
        except jwt.InvalidAudienceError:
            what = "a subscribe token (aud" if subscribe_token else "a token (aud"
            raise unauthorized("invalid_token", f"not {what} {audience!r})") from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized("invalid_token", f"invalid token: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the boundary: any garbage a client sends
            raise unauthorized("invalid_token", f"invalid token ({type(exc).__name__})") from None
        return self._grant(claims, subscribe_token, now)

    def _grant(self, claims: dict, subscribe_token: bool, now: float) -> Grant:
        user = claims.get("sub")
        if not valid_user(user):
            raise unauthorized("invalid_token", f"'sub' must be 1-{USER_MAX} printable characters")
        videos = claims.get("videos")
        if videos is not None:
            if not isinstance(videos, list) or not all(isinstance(v, str) for v in videos):
                raise unauthorized("invalid_token", "'videos' must be a list of strings")
            videos = tuple(videos)
        actions = claims.get("actions")
        if actions is None:
            actions = ACTIONS
        elif not isinstance(actions, list) or not all(a in ACTIONS for a in actions):
            raise unauthorized("invalid_token", f"'actions' must be a list of {', '.join(sorted(ACTIONS))}")
        actions = frozenset(actions)
        exp = claims["exp"]
        if subscribe_token:
            iat = claims["iat"]
            if not isinstance(iat, (int, float)) or exp - iat > self.subscribe_ttl:
                raise unauthorized("invalid_token", f"a subscribe token may live at most "
                                   f"{self.subscribe_ttl:g} s (exp - iat)")
            actions = actions & {ACTION_SUBSCRIBE}
        else:
            iat = claims.get("iat")
            lifetime = exp - (iat if isinstance(iat, (int, float)) else now)
            if lifetime > self.max_lifetime:
                raise unauthorized("token_lifetime_too_long",
                                   f"a publish token may live at most {self.max_lifetime:g} s "
                                   f"({'exp - iat' if iat is not None else 'exp - now'} is {lifetime:.0f} s)")
        return Grant(user, videos, actions, float(exp))


def _algorithms_of(pem: bytes) -> list[str]:
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise ConfigError(f"security.jwt_public_key: not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError("security.jwt_public_key: RSA keys need at least 2048 bits")
        return ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "ES256", "secp384r1": "ES384"}
        if key.curve.name not in curves:
            raise ConfigError(f"security.jwt_public_key: EC curve {key.curve.name} is not supported "
                              "(P-256 or P-384)")
        return [curves[key.curve.name]]
    raise ConfigError("security.jwt_public_key: only RSA and EC public keys are supported")


class SubscribePolicy:
    """Which videos are private (a token is needed to watch them): glob patterns of ids."""

    def __init__(self, private_patterns: Iterable[str] = ()):
        self.patterns = tuple(private_patterns)

    def is_private(self, video: str) -> bool:
        return any(fnmatch.fnmatchcase(video, p) for p in self.patterns)
