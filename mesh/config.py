"""Configuration: TOML files under ``config/`` plus environment overrides.

Precedence (later wins): built-in defaults, the TOML file, ``LIVEMESH_<SECTION>_<KEY>``
environment variables (``LIVEMESH_FRONTEND_PORT=8081`` sets ``[frontend] port``), explicit
overrides passed by a launcher.  Every value is checked against its declared type and range;
an unknown section or key, or a bad value, raises ``ConfigError`` naming the key and where it
came from.  docs/CONFIG.md lists every key (``markdown_table``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping

from mesh.errors import ConfigError

ENV_PREFIX = "LIVEMESH_"


def _spec(default, lo=None, hi=None, choices=None, doc=""):
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "doc": doc})


@dataclass
class NodeSection:
    name: str = _spec("", doc="node name, unique in the mesh (default: role-port)")
    dc: str = _spec("dc1", doc="datacenter name")
    log_level: str = _spec("info", choices=("debug", "info", "warning", "error"), doc="log level")
    log_json: bool = _spec(False, doc="log one JSON object per line")


@dataclass
class KVSection:
    backend: str = _spec("embedded", choices=("memory", "embedded", "consul"),
                         doc="memory (one process), embedded (SQLite file, one host), consul")
    path: str = _spec("/tmp/livemesh-kv.db", doc="embedded: SQLite file shared by the host's nodes")
    liveness_ttl: float = _spec(5.0, lo=1.0, hi=300.0,
                                doc="embedded: seconds after which a silent node and its counts expire")
    consul_addr: str = _spec("127.0.0.1:8500", doc="consul: agent HTTP address host:port")
    consul_scheme: str = _spec("http", choices=("http", "https"), doc="consul: scheme")
    consul_token: str = _spec("", doc="consul: ACL token")
    session_ttl: float = _spec(10.0, lo=10.0, hi=86400.0, doc="consul: session TTL seconds")
    prefix: str = _spec("livemesh", doc="consul: KV key prefix")


@dataclass
class FrontendSection:
    host: str = _spec("127.0.0.1", doc="HTTP listen address")
    port: int = _spec(8080, lo=0, hi=65535, doc="HTTP listen port (0: any free port)")
    heartbeat_interval: float = _spec(15.0, lo=0.05, hi=3600.0, doc="SSE comment heartbeat seconds")
    retry_ms: int = _spec(2000, lo=0, hi=600000, doc="SSE retry: sent to browsers")
    drain_seconds: float = _spec(1.5, lo=0.0, hi=600.0,
                                 doc="on SIGTERM: seconds /healthz answers 503 `draining` while the frontend "
                                     "still serves, before it stops listening and ends its streams; above "
                                     "the load balancer's time to mark it down (0.6 s with "
                                     "config/haproxy.cfg.template)")
    publish_timeout: float = _spec(3.0, lo=0.05, hi=60.0, doc="deadline for an owner's ack, seconds")
    attempt_timeout: float = _spec(1.0, lo=0.01, hi=60.0, doc="one publish attempt before retrying")
    sync_timeout: float = _spec(2.0, lo=0.01, hi=60.0,
                                doc="max wait for a new subscription to reach the owner")
    gap_timeout: float = _spec(1.0, lo=0.01, hi=60.0,
                               doc="max wait for history to fill a gap or catch a viewer up")
    history_deadline: float = _spec(0.3, lo=0.0, hi=60.0,
                                    doc="seconds a catch-up waits for a video's owner before it also "
                                    "asks the video's backup, which holds the replicated chain")
    public_origins: tuple = _spec((), doc="origins (`scheme://host[:port]`) the page is served under besides the ones "
                                  "the frontend listens on (`http://127.0.0.1:PORT`, `localhost`), e.g. a load "
                                  "balancer's `https://live.example`: browsers there publish as the page's own; never "
                                  "derived from a request's `Host` (`;`-separated in env)")
    max_body_bytes: int = _spec(16384, lo=64, hi=1048576, doc="largest publish body")
    max_comment_chars: int = _spec(2000, lo=1, hi=100000, doc="longest comment text")
    publish_fast_path: bool = _spec(True, doc="answer plain likes and comments off Tornado's HTTP stack "
                                    "(frontend/ingest.py); false: Tornado serves every request")
    count_flush_interval: float = _spec(1.0, lo=0.0, hi=3600.0,
                                        doc="coalescing interval for KV count changes (not 0<->1)")
    max_buffer_bytes: int = _spec(1048576, lo=1024, hi=1 << 30,
                                  doc="per-viewer unsent bytes before the viewer is cut")
    fanout_slice: int = _spec(1000, lo=1, hi=1000000,
                              doc="connections written per loop turn (~13 ms of sends at 1,000)")
    fanout_tick: float = _spec(0.05, lo=0.0, hi=5.0,
                               doc="a busy video's events are written at most once per tick per viewer "
                                   "(the first after a quiet tick at once); 0: off")
    aggregate_likes_above: int = _spec(20, lo=0, hi=1000000,
                                       doc="a write carrying more likes than this sends each run of "
                                           "consecutive likes as one 'likes' event; 0: off")
    gc_freeze_after: int = _spec(1000, lo=0, hi=100000000,
                                 doc="gc.freeze() once this many viewers opened since the last freeze "
                                     "(keeps them out of full collections); 0: never")
    coalesce_max: int = _spec(256, lo=1, hi=100000,
                              doc="most queued fan-out messages merged into one write per viewer (1: off)")
    fault_drop_every: int = _spec(0, lo=0, hi=1000000,
                                  doc="fault injection (tests): drop every Nth fan-out message; 0: off")


@dataclass
class DispatcherSection:
    host: str = _spec("127.0.0.1", doc="address ZeroMQ and HTTP bind to")
    router_port: int = _spec(0, lo=0, hi=65535, doc="ROUTER port (publish in); 0: any")
    pub_port: int = _spec(0, lo=0, hi=65535, doc="XPUB port (fan-out out); 0: any")
    http_port: int = _spec(0, lo=0, hi=65535, doc="HTTP port (health); 0: any")
    history_size: int = _spec(1000, lo=0, hi=1000000, doc="events kept per video")
    history_age: float = _spec(300.0, lo=0.0, hi=86400.0, doc="seconds an event stays in history")
    dedupe_size: int = _spec(100000, lo=0, hi=10000000, doc="recent event ids kept for idempotency")
    pub_hwm: int = _spec(100000, lo=0, hi=10000000, doc="XPUB send high-water mark per peer")
    drain_seconds: float = _spec(2.0, lo=0.0, hi=600.0,
                                 doc="on SIGTERM: seconds to keep forwarding after leaving the registry")


@dataclass
class BridgeSection:
    host: str = _spec("127.0.0.1", doc="bridge: address its ZeroMQ and HTTP sockets bind to")
    export_port: int = _spec(0, lo=0, hi=65535,
                             doc="bridge: XPUB port peer DCs' bridges connect to (this DC's events out); 0: any")
    import_port: int = _spec(0, lo=0, hi=65535,
                             doc="bridge: XPUB port this DC's frontends connect to (peer DCs' events in); 0: any")
    http_port: int = _spec(0, lo=0, hi=65535, doc="bridge: HTTP port (health, metrics); 0: any")
    peers: tuple = _spec((), doc="bridge: peer DCs' export endpoints, `dc=tcp://host:port` (`;`-separated in env); "
                                 "`consul` (or empty on kv.backend consul): found in the WAN-federated catalog")
    hwm: int = _spec(100000, lo=0, hi=10000000, doc="bridge: high-water mark of its proxy sockets, per peer")
    relay_port: int = _spec(0, lo=0, hi=65535,
                            doc="bridge: ROUTER port for history requests (this DC's frontends, peer bridges); 0: any")
    relay_peers: tuple = _spec((), doc="bridge: peer DCs' relay endpoints, `dc=tcp://host:port` "
                                       "(`;`-separated in env); a DC missing here: its gaps reset; "
                                       "found with the peers when they are discovered on Consul")
    fault_drop_every: int = _spec(0, lo=0, hi=1000000,
                                  doc="fault injection (tests): drop every Nth imported event batch; 0: off")


@dataclass
class PresenceSection:
    flush: float = _spec(0.25, lo=0.01, hi=60.0, doc="frontend: seconds between presence deltas to owners")
    refresh: float = _spec(2.0, lo=0.1, hi=600.0, doc="frontend: seconds between full presence snapshots")
    expiry: float = _spec(6.0, lo=0.3, hi=3600.0,
                          doc="dispatcher: a frontend silent this long is dropped (it died)")
    grace: float = _spec(5.0, lo=0.0, hi=3600.0,
                         doc="dispatcher: a user gone from every frontend this long gets 'leave'")
    count_interval: float = _spec(1.0, lo=0.0, hi=3600.0, doc="dispatcher: at most one 'count' per interval")
    count_writes_max: int = _spec(5000, lo=0, hi=100000000,
                                  doc="frontend: viewer-count writes per second at most: a video's count reaches its "
                                      "viewers at most every (frontend's viewers / this) seconds, the latest one "
                                      "(0: every count at once)")
    broadcast_max: int = _spec(1000, lo=0, hi=100000000,
                               doc="above this many viewers, per-user join/leave is not broadcast")
    dc_flush: float = _spec(0.25, lo=0.01, hi=60.0,
                            doc="dispatcher: seconds between changes of its DC's presence sent to peer DCs")
    dc_refresh: float = _spec(5.0, lo=0.1, hi=600.0,
                              doc="dispatcher: seconds between full summaries of its DC's presence to peer DCs")
    dc_expiry: float = _spec(15.0, lo=0.3, hi=3600.0,
                             doc="dispatcher: a peer DC's presence not refreshed this long is dropped")


@dataclass
class SecuritySection:
    auth: str = _spec("off", choices=("off", "jwt"),
                      doc="publish authentication: off (anyone may publish; logged loudly at start) or jwt")
    jwt_secret: str = _spec("", doc="HS256 secret (at least 32 bytes); prefer the environment variable")
    jwt_public_key: str = _spec("", doc="PEM file of the RS256 (RSA) or ES256 (EC P-256) public key")
    jwt_audience: str = _spec("livemesh", doc="required `aud` of tokens (never empty with auth = jwt); subscribe tokens: this + `-subscribe`")
    jwt_issuer: str = _spec("", doc="required `iss` of tokens (empty: not checked)")
    jwt_leeway: float = _spec(5.0, lo=0.0, hi=300.0, doc="seconds of clock skew allowed on `exp`")
    jwt_max_lifetime: float = _spec(86400.0, lo=1.0, hi=31536000.0,
                                    doc="longest life of a publish token: `exp - iat`, or `exp - now` without `iat` (401 `token_lifetime_too_long` beyond)")
    subscribe_token_ttl: float = _spec(300.0, lo=1.0, hi=86400.0,
                                       doc="longest life (`exp - iat`) of a `?access_token=` subscribe token")
    private_videos: tuple = _spec((), doc="video id glob patterns that need a token to watch (`;`-separated in env)")
    like_rate: float = _spec(5.0, lo=0.0, hi=1e6, doc="likes per second per user per video (token users; 0: off)")
    like_burst: int = _spec(20, lo=1, hi=1000000, doc="like burst per user per video")
    comment_rate: float = _spec(0.5, lo=0.0, hi=1e6, doc="comments per second per user per video (0: off)")
    comment_burst: int = _spec(5, lo=1, hi=1000000, doc="comment burst per user per video")
    ip_rate: float = _spec(100.0, lo=0.0, hi=1e6, doc="publishes per second per client IP (0: off)")
    ip_burst: int = _spec(1000, lo=1, hi=1000000, doc="publish burst per client IP")
    max_json_depth: int = _spec(4, lo=1, hi=64, doc="deepest nesting of a publish body")
    cors_origins: tuple = _spec((), doc="origins allowed to call the API from a browser (`*`: any, never with credentials)")
    cors_credentials: bool = _spec(False, doc="send Access-Control-Allow-Credentials to listed origins")
    max_viewers: int = _spec(19000, lo=1, hi=10000000, doc="SSE connections per frontend (503 beyond)")
    max_viewers_per_ip: int = _spec(1000, lo=1, hi=10000000,
                                     doc="SSE connections per client IP (429 beyond; NATs put many viewers behind one)")
    max_connections_per_ip: int = _spec(0, lo=0, hi=10000000,
                                        doc="TCP connections per client IP, of every kind: streams, keep-alive, requests "
                                            "in flight (429 `too_many_connections` beyond, then closed); above "
                                            "`max_viewers_per_ip`; 0: `max_viewers_per_ip` + 100")
    header_timeout: float = _spec(10.0, lo=0.1, hi=3600.0,
                                  doc="seconds to receive a request's headers (slowloris) or the next request (idle), "
                                      "and to write an answer the client does not read (then the connection is cut)")
    fd_reserve: int = _spec(100, lo=0, hi=100000,
                            doc="file descriptors kept free: TCP connections past the open-file limit minus this get a 503")
    curve: bool = _spec(False, doc="CURVE-encrypt and authenticate ZeroMQ links (false: plaintext, logged loudly)")
    curve_secret_key: str = _spec("", doc="this node's `NAME.key_secret` (`meshctl keys`)")
    curve_public_keys: str = _spec("", doc="directory of allowed public keys `NAME.key` (clients and servers)")


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    kv: KVSection = field(default_factory=KVSection)
    frontend: FrontendSection = field(default_factory=FrontendSection)
    dispatcher: DispatcherSection = field(default_factory=DispatcherSection)
    bridge: BridgeSection = field(default_factory=BridgeSection)
    presence: PresenceSection = field(default_factory=PresenceSection)
    security: SecuritySection = field(default_factory=SecuritySection)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _coerce(key: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    want = type(f.default)
    where = f"{key} (from {source})"
    if want is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if want is int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif want is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif want is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(";") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        value = tuple(value)
    elif want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    meta = f.metadata
    if meta["lo"] is not None and value < meta["lo"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['lo']}")
    if meta["hi"] is not None and value > meta["hi"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['hi']}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    return value


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = cfg.sections()
    if section not in sections:
        raise ConfigError(f"{section}.{key} (from {source}): unknown section {section!r}; "
                          f"known: {', '.join(sections)}")
    obj = sections[section]
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"{section}.{key} (from {source}): unknown key; known keys of "
                          f"[{section}]: {', '.join(fields)}")
    setattr(obj, key, _coerce(f"{section}.{key}", fields[key], value, source))


def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a Config from defaults, ``path`` (TOML), ``env`` and ``overrides``
    (``{"frontend.port": 0}``).  ``env`` defaults to ``os.environ``; ``LIVEMESH_CONFIG`` names
    the file when ``path`` is None."""
    env = os.environ if env is None else env
    cfg = Config()
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section} (from {path}): expected a [{section}] table")
            for key, value in values.items():
                _apply(cfg, section, key, value, path)
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in cfg.sections():
            _apply(cfg, section, key, value, f"environment {name}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, value, "command line")
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """The rules that span keys, once every source is applied."""
    sec = cfg.security
    cfg.frontend.public_origins = tuple(canonical_origin(o, "frontend.public_origins")
                                        for o in cfg.frontend.public_origins)
    if sec.max_connections_per_ip and sec.max_connections_per_ip <= sec.max_viewers_per_ip:
        raise ConfigError(f"security.max_connections_per_ip: {sec.max_connections_per_ip} must be above "
                          f"security.max_viewers_per_ip ({sec.max_viewers_per_ip}): an address's streams are "
                          f"connections too, and its publishes need room beside them (0: "
                          f"max_viewers_per_ip + 100)")
    if sec.auth == "jwt" and not sec.jwt_audience.strip():
        raise ConfigError("security.jwt_audience: must not be empty when security.auth = jwt "
                          "(an empty audience would accept tokens minted for any service)")


#: the port an origin leaves out, per scheme
DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_origin(text: str, key: str) -> str:
    """``text`` as a browser serializes an origin in its ``Origin`` header (RFC 6454 6.1:
    lower-case scheme and host, no default port, no path), so a configured origin compares
    equal to the header byte for byte; raises ``ConfigError`` naming ``key`` when ``text`` is
    not an origin."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{key}: {text!r} is not an origin (scheme://host[:port]): {why}")

    parts = urllib.parse.urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise refuse("the scheme must be http or https")
    if not parts.hostname or "@" in parts.netloc:
        raise refuse("it needs a host, and no user or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.strip().endswith(("?", "#")):
        raise refuse("an origin has no path, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise refuse("the port must be a number from 0 to 65535") from None
    host = parts.hostname  # lower-cased; IPv6 without its brackets
    if not host.isascii() or not all(ch.isalnum() or ch in ".-:" for ch in host):
        raise refuse("the host must be ASCII letters, digits, '.', '-' (punycode for other names) "
                     "or a bracketed IPv6 address")
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: the source of docs/CONFIG.md."""
    rows = []
    for section, obj in Config().sections().items():
        for f in dataclasses.fields(obj):
            rows.append((section, f.name, f.default, f.metadata["doc"]))
    return rows


def markdown_table() -> str:
    """The configuration table of docs/CONFIG.md (``python -m mesh.config``)."""
    lines = ["| key | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for section, key, default, doc in describe():
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, str):
            shown = f'"{default}"'
        else:
            shown = repr(default)
        lines.append(f"| `{section}.{key}` | `{ENV_PREFIX}{section.upper()}_{key.upper()}` | `{shown}` | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
