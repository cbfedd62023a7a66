"""Consul KV backend: subscription counts in Consul KV, the node registry in Consul's catalog.

Theory of operation
-------------------

Key layout (one key per (video, frontend): a Consul session deletes only the keys it acquired,
and a key has one holder)::

    {prefix}/{dc}/subs/{video}/{frontend}  ->  the count as ASCII decimal, e.g. b"3"

``video`` and ``frontend`` are percent-encoded (``urllib.parse.quote(s, safe="")``), which
leaves ``A-Z a-z 0-9 _ . - ~`` unchanged, so a ``/`` inside an id cannot shift the layout.
Only counts > 0 are stored; writing 0 deletes the key.

Liveness: :meth:`ConsulKV.register` creates a session named ``livemesh-{node}`` (TTL =
``session_ttl``, ``behavior=delete``, lock-delay ``lock_delay``) and writes every count key
with that session as its lock holder (transaction verb ``lock``, the ``?acquire=`` of a
plain PUT).  A background task renews the session every TTL/2.  When the process dies the
servers invalidate the session after at most 2 x TTL (Consul arms its timer at TTL x 2) and
delete every key it holds, hence ``liveness_bound = 2 x TTL + lock_delay``.  On ``register``
a session left by an earlier incarnation of the same node name is destroyed at once, so a
restarted node does not wait for its predecessor's keys to expire.

Node registry: every node is a Consul service ``livemesh-{role}`` with ID = node name, its
endpoints in the service Meta (``role dc http router pub``) and a TTL check the renew task
passes along with the session (``DeregisterCriticalServiceAfter`` removes the entries of dead
nodes after a minute).  :meth:`nodes` reads ``/v1/health/service/livemesh-{role}``;
``healthy`` means every check of the entry passes.  :meth:`watch_nodes` is a real blocking
query (``index`` + ``wait``).  For ``role=None`` the per-role queries run at once with the
same index: Raft indexes are global and monotonic, so a change to any of the services
returns its query with a larger index; the union is then re-read and its largest index
returned.  The other queries are abandoned and end on their own within ``wait`` (Tornado
cannot abort a request in flight), so watch one role where one role will do.

Writes: every KV write is a Raft append with an fsync, so :meth:`write_counts` sends one
``/v1/txn`` per 64 operations (Consul's limit) and ``kv_writes`` counts those requests
(``kv_ops`` the operations).  A call with more than 64 entries is atomic per chunk only.

Outages: every method raises ``KVError`` when the agent is unreachable or rejects a request.
The renew task logs a warning (logger ``mesh.kv``) and retries with exponential backoff
(capped at ``BACKOFF_MAX``).  If the session turns out to be gone (it expired during the
outage, or a ``-dev`` agent restarted and lost its state), the task creates a new session,
registers the service again and bumps ``generation``: the owner must write its counts again.

HTTP: py-consul's endpoint wrappers (``consul.base.Consul``) over a Tornado
``AsyncHTTPClient`` adapter.  py-consul dropped its own Tornado client in 1.3.0, and its
``consul.aio`` client needs aiohttp, which is not a dependency of livemesh; Tornado is, and
its per-request timeout lets each blocking query wait exactly as long as it asked to.

Several datacenters (WAN federation): each livemesh DC is its own Consul datacenter of the
same name, and its nodes talk to an agent of that DC (Consul KV is per datacenter: writes,
sessions and services stay local).  :meth:`datacenters` lists the datacenters the agent's
servers know over WAN gossip (``/v1/catalog/datacenters``); :meth:`in_datacenter` gives a
read-only view of another DC through the same agent: its counts under ``{prefix}/{dc}/subs/``
and its nodes, every read sent with ``?dc=`` (py-consul's ``dc=``), which the local servers
forward over server RPC to that DC's servers.  A DC whose servers cannot be reached answers
with an error (``KVError``: "No path to datacenter", "rpc error ..."), never stale data:
default-consistency reads are answered by that DC's leader.

Limits: ``dc`` names the key prefix and the nodes' Meta; without a view, requests go to the
datacenter of the agent at ``host:port``.  py-consul lets
``CONSUL_HTTP_TOKEN`` override ``token``.  ``/v1/txn`` is sent directly because py-consul's
``txn.put`` drops the ACL token.  After an agent loses its state the Raft index goes back:
one :meth:`watch_nodes` call may then wait its full ``wait`` before it sees the new index.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import urllib.parse
from typing import Any, Callable, Mapping

import consul
import consul.base
from consul.callback import CB
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError

from mesh.errors import ConfigError, KVError
from mesh.kv import KV, ROLES, Counts, NodeInfo

log = logging.getLogger("mesh.kv")

TXN_MAX_OPS = 64          # operations per /v1/txn (Consul's documented limit)
REQUEST_TIMEOUT = 10.0    # seconds for a non-blocking request
BACKOFF_MIN = 0.25        # first retry of a failed renewal, seconds; doubles per failure
BACKOFF_MAX = 4.0         # below TTL/2 >= 5 s, so an outage never slows renewal down
DEREGISTER_CRITICAL_AFTER = "1m"  # Consul's minimum; drops services of dead nodes
SESSION_TTL_MIN, SESSION_TTL_MAX = 10.0, 86400.0  # Consul's (and py-consul's) TTL range
SERVICE_PREFIX = "livemesh-"

_CONSUL_ERRORS = (consul.ConsulException, HTTPClientError, StreamClosedError, OSError)


class ConsulKV(KV):
    """Counts and nodes in Consul; see the module docstring for layout and liveness."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8500, dc: str = "dc1",
                 prefix: str = "livemesh", session_ttl: float = 10.0, lock_delay: float = 0.0,
                 scheme: str = "http", token: str | None = None,
                 request_timeout: float = REQUEST_TIMEOUT, datacenter: str | None = None):
        if not SESSION_TTL_MIN <= session_ttl <= SESSION_TTL_MAX:
            raise ConfigError(f"consul session_ttl must be within {SESSION_TTL_MIN:g}.."
                              f"{SESSION_TTL_MAX:g} s (Consul's range), got {session_ttl!r}")
        if lock_delay < 0:
            raise ConfigError(f"consul lock_delay must be >= 0, got {lock_delay!r}")
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ConfigError(f"consul prefix must be non-empty without leading/trailing '/', "
                              f"got {prefix!r}")
        self.host, self.port, self.scheme, self.token = host, port, scheme, token
        self.dc = dc
        self.prefix = prefix
        self.session_ttl = float(session_ttl)
        self.lock_delay = float(lock_delay)
        self.request_timeout = request_timeout
        #: the Consul datacenter reads go to (``?dc=``); None: the agent's own.  Set only on
        #: the read-only views :meth:`in_datacenter` returns.
        self.datacenter = datacenter
        self.liveness_bound = 2 * self.session_ttl + self.lock_delay
        self.generation = 0
        self.kv_writes = 0  # /v1/txn requests sent by write_counts
        self.kv_ops = 0     # KV operations inside them
        self.node: NodeInfo | None = None
        self.session_id: str | None = None
        self._subs_prefix = f"{prefix}/{dc}/subs/"
        self._consul: _TornadoConsul | None = None
        self._keepalive: asyncio.Task | None = None
        self._renew_now: asyncio.Event | None = None

    @property
    def addr(self) -> str:
        agent = f"{self.scheme}://{self.host}:{self.port}"
        return agent if self.datacenter is None else f"{agent} (dc={self.datacenter})"

    def in_datacenter(self, dc: str) -> "ConsulKV":
        """A read-only view of datacenter ``dc`` through this agent (WAN federation):
        :meth:`read_counts` and :meth:`nodes` of that DC; close it after use."""
        return ConsulKV(self.host, self.port, dc=dc, prefix=self.prefix,
                        session_ttl=self.session_ttl, scheme=self.scheme, token=self.token,
                        request_timeout=self.request_timeout, datacenter=dc)

    async def datacenters(self) -> list[str]:
        """Every datacenter the agent's servers know (their own and WAN-federated ones)."""
        names = await self._call("list datacenters", lambda c: c.catalog.datacenters())
        return sorted(names or ())

    def _refuse_remote(self, what: str) -> None:
        if self.datacenter is not None:
            raise KVError(f"consul {self.addr}: cannot {what}: a view of another datacenter "
                          "is read-only (sessions and services live in the node's own DC)")

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._consul is None:
            self._consul = _TornadoConsul(host=self.host, port=self.port, scheme=self.scheme,
                                          token=self.token, request_timeout=self.request_timeout)

    async def close(self) -> None:
        await self._stop_keepalive()
        if self._consul is not None:
            self._consul.close()
            self._consul = None

    async def register(self, node: NodeInfo) -> None:
        self._refuse_remote(f"register {node.name}")
        await self.open()
        await self._stop_keepalive()
        if self.session_id is not None:
            await self._destroy_session(self.session_id)
            self.session_id = None
        self.node = node
        await self._destroy_stale_sessions()
        self.session_id = await self._create_session()
        await self._register_service()
        self._renew_now = asyncio.Event()
        self._keepalive = asyncio.get_running_loop().create_task(
            self._keep_alive(), name=f"consul-keepalive-{node.name}")

    async def deregister(self) -> None:
        # Stop renewing first: should the calls below fail, the session still expires.
        await self._stop_keepalive()
        node, session_id = self.node, self.session_id
        self.node = self.session_id = None
        if session_id is not None:
            await self._destroy_session(session_id)
        if node is not None:
            await self._call(f"deregister service {node.name}",
                             lambda c: c.agent.service.deregister(node.name))

    # -- counts ------------------------------------------------------------------------------

    async def write_counts(self, frontend: str, counts: Mapping[str, int]) -> None:
        self._refuse_remote("write counts")
        ops = []
        for video, count in counts.items():
            key = self._key(video, frontend)
            if count > 0:
                if self.session_id is None:
                    raise KVError("consul: write_counts before register(): counts must be "
                                  "bound to a session")
                value = base64.b64encode(str(int(count)).encode()).decode()
                ops.append({"KV": {"Verb": "lock", "Key": key, "Value": value,
                                   "Session": self.session_id}})
            else:
                ops.append({"KV": {"Verb": "delete", "Key": key}})
        for start in range(0, len(ops), TXN_MAX_OPS):
            chunk = ops[start:start + TXN_MAX_OPS]
            await self._txn(chunk)
            self.kv_writes += 1
            self.kv_ops += len(chunk)

    async def read_counts(self, video: str | None = None) -> Counts:
        prefix = self._subs_prefix if video is None else f"{self._subs_prefix}{_quote(video)}/"
        _, items = await self._call("read counts", lambda c: c.kv.get(prefix, recurse=True, dc=self.datacenter))
        counts: Counts = {}
        for item in items or ():
            key = item.get("Key", "")
            video_q, _, frontend_q = key[len(self._subs_prefix):].partition("/")
            try:
                count = int(item.get("Value") or b"")
            except ValueError:
                log.warning("consul %s: ignoring malformed count %r at %s", self.addr,
                            item.get("Value"), key)
                continue
            if count > 0 and frontend_q and "/" not in frontend_q:
                counts.setdefault(_unquote(video_q), {})[_unquote(frontend_q)] = count
        return counts

    # -- nodes -------------------------------------------------------------------------------

    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        _, nodes = await self._read_nodes(_roles(role))
        return nodes

    async def watch_nodes(self, role: str | None, index: int, wait: float) -> tuple[int, list[NodeInfo]]:
        roles = _roles(role)
        if not index:
            return await self._read_nodes(roles)
        wait_arg = f"{max(1, round(wait * 1000))}ms"
        queries = [asyncio.ensure_future(self._health(r, index=index, wait=wait_arg))
                   for r in roles]
        try:
            done, _ = await asyncio.wait(queries, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for query in queries:
                query.cancel()
            await asyncio.gather(*queries, return_exceptions=True)
        for query in done:
            query.result()  # raise its KVError
        if len(roles) == 1:
            return queries[0].result()
        return await self._read_nodes(roles)

    async def _read_nodes(self, roles: tuple[str, ...]) -> tuple[int, list[NodeInfo]]:
        results = await asyncio.gather(*(self._health(r) for r in roles))
        index = max(i for i, _ in results)
        return index, sorted((n for _, ns in results for n in ns), key=lambda n: n.name)

    async def _health(self, role: str, index: int = 0, wait: str | None = None
                      ) -> tuple[int, list[NodeInfo]]:
        index_s, entries = await self._call(
            f"read nodes of {role}",
            lambda c: c.health.service(SERVICE_PREFIX + role, index=index or None, wait=wait,
                                       dc=self.datacenter))
        nodes = sorted((self._node_from_entry(role, e) for e in entries or ()),
                       key=lambda n: n.name)
        # Consul's advice: an index must be > 0 (0 would mean "do not block" next time).
        return max(1, int(index_s)), nodes

    def _node_from_entry(self, role: str, entry: Mapping[str, Any]) -> NodeInfo:
        service = entry.get("Service") or {}
        meta = service.get("Meta") or {}
        checks = entry.get("Checks") or ()
        return NodeInfo(name=service.get("ID", ""), role=meta.get("role", role),
                        dc=meta.get("dc", self.dc), http=meta.get("http", ""),
                        router=meta.get("router", ""), pub=meta.get("pub", ""),
                        export=meta.get("export", ""),
                        healthy=all(ch.get("Status") == "passing" for ch in checks))

    # -- session and service -----------------------------------------------------------------

    @property
    def _session_name(self) -> str:
        return f"livemesh-{self.node.name}"

    @property
    def _check_id(self) -> str:
        return f"service:{self.node.name}"

    async def _create_session(self) -> str:
        return await self._call("create session", lambda c: c.session.create(
            name=self._session_name, behavior="delete", ttl=self.session_ttl,
            lock_delay=self.lock_delay))

    async def _destroy_session(self, session_id: str) -> None:
        await self._call(f"destroy session {session_id}",
                         lambda c: c.session.destroy(session_id))

    async def _destroy_stale_sessions(self) -> None:
        _, sessions = await self._call("list sessions", lambda c: c.session.list())
        for session in sessions or ():
            if session.get("Name") == self._session_name:
                log.warning("consul %s: destroying session %s left by an earlier %s (its counts "
                            "go with it)", self.addr, session.get("ID"), self.node.name)
                await self._destroy_session(session["ID"])

    async def _register_service(self) -> None:
        node = self.node
        meta = {"role": node.role, "dc": node.dc}
        meta.update({k: v for k, v in (("http", node.http), ("router", node.router),
                                       ("pub", node.pub), ("export", node.export)) if v})
        check = {**consul.Check.ttl(f"{self.session_ttl:g}s"), "CheckID": self._check_id,
                 "Name": "livemesh keep-alive", "Status": "passing",
                 "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER}
        url = urllib.parse.urlsplit(node.http) if node.http else None
        try:
            address, port = (url.hostname, url.port) if url else (None, None)
        except ValueError:  # a malformed port in the URL: Meta still has the whole URL
            address, port = None, None
        ok = await self._call(f"register service {node.name}", lambda c: c.agent.service.register(
            SERVICE_PREFIX + node.role, service_id=node.name, address=address, port=port,
            meta=meta, check=check))
        if not ok:
            raise KVError(f"consul {self.addr}: register service {node.name}: rejected")

    async def _keep_alive(self) -> None:
        failures = 0
        while True:
            delay = (self.session_ttl / 2 if not failures
                     else min(BACKOFF_MIN * 2 ** (failures - 1), BACKOFF_MAX))
            try:
                await asyncio.wait_for(self._renew_now.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._renew_now.clear()
            try:
                await self._renew_once()
            except KVError as exc:
                failures += 1
                log.warning("consul %s: keeping %s alive failed (%d in a row, retry in %.2f s): %s",
                            self.addr, self.node.name, failures,
                            min(BACKOFF_MIN * 2 ** (failures - 1), BACKOFF_MAX), exc)
            except Exception:
                # A bug here must not end liveness for good: log it and keep trying.
                failures += 1
                log.exception("consul %s: unexpected error keeping %s alive", self.addr,
                              self.node.name)
            else:
                if failures:
                    log.info("consul %s: %s alive again after %d failed attempts", self.addr,
                             self.node.name, failures)
                failures = 0

    async def _renew_once(self) -> None:
        session_id = self.session_id
        try:
            await self._call("renew session", lambda c: c.session.renew(session_id))
        except KVError as exc:
            if not isinstance(exc.__cause__, consul.NotFound):
                raise
            await self._recreate(session_id)
            return
        passed = await self._call("pass TTL check",
                                  lambda c: c.agent.check.ttl_pass(self._check_id))
        if not passed:  # 404: the agent lost our service (e.g. a restarted client agent)
            log.warning("consul %s: service %s was gone from the agent; registering it again",
                        self.addr, self.node.name)
            await self._register_service()

    async def _recreate(self, old_session: str | None) -> None:
        self.session_id = await self._create_session()
        # Bump before anything else can fail: the counts are gone whatever happens next (a
        # failed service registration is repaired by the next renewal's TTL-check pass).
        self.generation += 1
        log.warning("consul %s: session %s of %s had expired (its counts are gone); new session "
                    "%s, generation %d: counts must be written again", self.addr, old_session,
                    self.node.name, self.session_id, self.generation)
        await self._register_service()

    async def _stop_keepalive(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- requests ----------------------------------------------------------------------------

    def _key(self, video: str, frontend: str) -> str:
        return f"{self._subs_prefix}{_quote(video)}/{_quote(frontend)}"

    async def _txn(self, ops: list[dict]) -> None:
        data = json.dumps(ops)
        try:
            await self._call(f"transaction of {len(ops)} operations", lambda c: c.http.put(
                CB.json(), "/v1/txn", headers=c.prepare_headers(), data=data))
        except KVError as exc:
            if "session" in str(exc.__cause__).lower() and self._renew_now is not None:
                self._renew_now.set()  # our session may be gone: let the keep-alive check now
            raise

    async def _call(self, what: str, request: Callable[["_TornadoConsul"], Any]) -> Any:
        """Run one py-consul request; every failure becomes a ``KVError`` whose ``__cause__``
        is the original exception."""
        await self.open()
        try:
            return await request(self._consul)
        except _CONSUL_ERRORS as exc:
            raise KVError(f"consul {self.addr}: {what} failed: {_describe(exc)}") from exc


def _roles(role: str | None) -> tuple[str, ...]:
    if role is None:
        return ROLES
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return (role,)


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _unquote(part: str) -> str:
    return urllib.parse.unquote(part)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # Consul's error bodies are indented JSON
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- py-consul over Tornado ------------------------------------------------------------------

_GO_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_GO_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _blocking_wait(uri: str) -> float:
    """Seconds a Consul blocking query in ``uri`` may wait (``index`` + ``wait``), else 0."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    if "index" not in query:
        return 0.0
    match = _GO_DURATION.match(query.get("wait", ["5m"])[0])  # Consul's default wait: 5 min
    return float(match[1]) * _GO_UNITS[match[2]] if match else 600.0


class _TornadoHTTPClient(consul.base.HTTPClient):
    """py-consul's transport on Tornado's ``AsyncHTTPClient``: the analogue of ``consul.aio``.
    A blocking query gets ``wait + wait/16`` (Consul's jitter) on top of the request timeout."""

    def __init__(self, *args, request_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout
        # Own instance: blocking queries must not queue behind (or starve) other users of the
        # loop's shared client.  max_clients bounds concurrent requests, watches included.
        self._client = AsyncHTTPClient(force_instance=True, max_clients=64)

    def _tls_kwargs(self) -> dict:
        kwargs: dict[str, Any] = {}
        if self.scheme == "https":
            kwargs["validate_cert"] = bool(self.verify)
            if isinstance(self.verify, str):
                kwargs["ca_certs"] = self.verify
            if isinstance(self.cert, tuple):
                kwargs["client_cert"], kwargs["client_key"] = self.cert
            elif self.cert:
                kwargs["client_cert"] = self.cert
        return kwargs

    async def _request(self, callback, method: str, uri: str, headers=None, data=None,
                       raw: bool = False, connections_timeout: float | None = None):
        wait = _blocking_wait(uri)
        timeout = (connections_timeout or self.request_timeout) + wait + wait / 16
        body = data.encode() if isinstance(data, str) else data
        if method in ("GET", "DELETE") and not body:
            body = None
        request = HTTPRequest(uri, method=method, headers=headers or {}, body=body,
                              connect_timeout=self.request_timeout, request_timeout=timeout,
                              allow_nonstandard_methods=True, **self._tls_kwargs())
        response = await self._client.fetch(request, raise_error=False)
        text = response.body if raw else (response.body or b"").decode("utf-8", "replace")
        return callback(consul.base.Response(response.code, response.headers, text))

    def get(self, callback, path, params=None, headers=None, raw=False, connections_timeout=None):
        return self._request(callback, "GET", self.uri(path, params), headers, raw=raw,
                             connections_timeout=connections_timeout)

    def put(self, callback, path, params=None, data="", headers=None, connections_timeout=None):
        return self._request(callback, "PUT", self.uri(path, params), headers, data,
                             connections_timeout=connections_timeout)

    def delete(self, callback, path, params=None, data="", headers=None, connections_timeout=None):
        return self._request(callback, "DELETE", self.uri(path, params), headers, data,
                             connections_timeout=connections_timeout)

    def post(self, callback, path, params=None, data="", headers=None, connections_timeout=None):
        return self._request(callback, "POST", self.uri(path, params), headers, data,
                             connections_timeout=connections_timeout)

    def close(self):
        self._client.close()


class _TornadoConsul(consul.base.Consul):
    def __init__(self, *args, request_timeout: float = REQUEST_TIMEOUT, **kwargs):
        self._request_timeout = request_timeout
        super().__init__(*args, **kwargs)

    def http_connect(self, host: str, port: int, scheme, verify: bool | str = True, cert=None):
        return _TornadoHTTPClient(host, port, scheme, verify=verify, cert=cert,
                                  request_timeout=self._request_timeout)

    def close(self):
        self.http.close()
