"""ZeroMQ CURVE on the node links: encryption and mutual authentication.

Theory of operation (the zguide's "Ironhouse" pattern).  Every node has its own keypair, made by
``meshctl keys NAME --dir DIR`` (``DIR/NAME.key`` public, ``DIR/NAME.key_secret`` secret, mode
0600).  A deployment gives each node its own secret file (``security.curve_secret_key``) and the
same directory of allowed public keys (``security.curve_public_keys``, ``*.key``).

* Every dispatcher binds ROUTER and XPUB as CURVE servers and runs a ZAP authenticator
  (pyzmq's ``zmq.auth.asyncio.AsyncioAuthenticator``) that admits a client only when its public
  key is a file in the public-key directory.  A client whose key is not there fails the
  handshake: it gets no messages at all (no fan-out, no replies) and its messages are never
  read.  The directory is read again when a file in it changes (``KeyDirectory``), so adding,
  removing or rotating a node's key needs no restart (established connections stay up until
  they reconnect).
* Frontends (SUB, DEALERs) and dispatchers (DEALERs to each other) are CURVE clients.  A client
  must know the server's public key before it connects: it is ``<dispatcher name>.key`` in the
  same directory, so a client connects only to dispatchers whose key it holds (a registry entry
  pointing somewhere else gets nowhere).  ``CURVE_SERVERKEY`` is copied into each connection
  when ``connect`` is called, so one SUB socket talks to many dispatchers, each with its key.

Plaintext is only what you configure (``security.curve = false``, the local-dev default); the
nodes say so in a warning at start.
"""

from __future__ import annotations

import logging
import os
import time

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from mesh.errors import ConfigError, MeshError

log = logging.getLogger("mesh.wire")

ZAP_DOMAIN = b"livemesh"
#: seconds between two warnings about the same refused key
DENY_LOG_INTERVAL = 60.0


class CurveError(MeshError):
    """A CURVE key is missing or unreadable."""


class CurveKeys:
    """This node's keypair and the directory of allowed public keys."""

    def __init__(self, secret_key_file: str, public_keys_dir: str):
        if not secret_key_file or not public_keys_dir:
            raise ConfigError("security.curve = true needs security.curve_secret_key and "
                              "security.curve_public_keys")
        try:
            public, secret = zmq.auth.load_certificate(secret_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"security.curve_secret_key: cannot load {secret_key_file}: {exc}") from None
        if not secret:
            raise ConfigError(f"security.curve_secret_key: {secret_key_file} holds no secret key")
        if not os.path.isdir(public_keys_dir):
            raise ConfigError(f"security.curve_public_keys: {public_keys_dir} is not a directory")
        self.public = public
        self.secret = secret
        self.public_dir = public_keys_dir

    def configure(self, sock: zmq.Socket, server: bool) -> None:
        """Set the CURVE options of a new socket (before bind/connect)."""
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        if server:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def server_key(self, name: str) -> bytes:
        """The public key of the node called ``name`` (``<dir>/<name>.key``)."""
        path = os.path.join(self.public_dir, f"{name}.key")
        if os.path.basename(path) != f"{name}.key" or name.startswith("."):
            raise CurveError(f"no usable key file name for node {name!r}")
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise CurveError(f"no public key for {name} ({path}: {exc})") from None
        return public


def connect(sock: zmq.Socket, endpoint: str, peer: str, curve: CurveKeys | None) -> None:
    """``sock.connect(endpoint)``, as a CURVE client of node ``peer`` when ``curve`` is set.
    Raises CurveError when we hold no key for ``peer`` (then nothing is connected)."""
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key(peer))
    sock.connect(endpoint)


class KeyDirectory:
    """The ZAP credentials provider: allowed client keys are the ``*.key`` files of a directory.

    The directory is fingerprinted per file (name, size, mtime_ns) at most once a second, on the
    next handshake, so a key replaced in place (``meshctl keys NAME --force``, which leaves the
    directory's own mtime alone) is seen as well as a file added or removed.  Only files whose
    fingerprint changed are read again, each on its own: a file that cannot be read or holds no
    valid public key (empty, half-copied, garbage) is logged and skipped, and the key that file
    last held stays allowed until it reads well again or is deleted.  Nothing a file holds can
    raise out of ``callback``, so the authenticator task never dies from one."""

    def __init__(self, path: str, stats: dict | None = None, clock=time.monotonic):
        self.path = path
        self.stats = stats if stats is not None else {}
        self.clock = clock
        self.allowed: set[bytes] = set()
        self._files: dict[str, tuple[int, int]] = {}   # file name -> (size, mtime_ns) last read
        self._keys: dict[str, bytes] = {}              # file name -> its last good public key
        self._checked = -1e9
        self._warned: dict[bytes, float] = {}
        self._reload()

    def _fingerprint(self) -> dict[str, tuple[int, int]] | None:
        found = {}
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if not entry.name.endswith(".key"):
                        continue
                    try:
                        st = entry.stat()
                    except OSError:
                        continue  # removed between the listing and the stat
                    found[entry.name] = (st.st_size, st.st_mtime_ns)
        except OSError as exc:
            log.error("CURVE public key directory %s unreadable (%s); keeping %d keys",
                      self.path, exc, len(self.allowed))
            return None
        return found

    def _load(self, name: str) -> bytes | None:
        path = os.path.join(self.path, name)
        try:
            public, _ = zmq.auth.load_certificate(path)
            if len(public) != 40 or len(z85.decode(public)) != 32:
                raise ValueError(f"not a 40-character Z85 public key ({len(public)} characters)")
        except Exception as exc:  # noqa: BLE001 - a file's content is untrusted input
            self.stats["curve_bad_key_files"] = self.stats.get("curve_bad_key_files", 0) + 1
            log.error("CURVE: skipping key file %s (%s: %s); keeping its last good key",
                      path, type(exc).__name__, exc)
            return None
        return public

    def _reload(self) -> None:
        found = self._fingerprint()
        if found is None or found == self._files:
            return
        for name in set(self._keys) - set(found):
            del self._keys[name]
        for name, fp in found.items():
            if self._files.get(name) != fp:
                public = self._load(name)
                if public is not None:
                    self._keys[name] = public
        self._files = found
        self.allowed = set(self._keys.values())
        log.info("CURVE: %d allowed public keys from %s", len(self.allowed), self.path)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        now = self.clock()
        if now - self._checked >= 1.0:
            self._checked = now
            self._reload()
        if z85_key in self.allowed:
            return True
        self.stats["curve_refused"] = self.stats.get("curve_refused", 0) + 1
        if now - self._warned.get(z85_key, -1e9) >= DENY_LOG_INTERVAL:
            if len(self._warned) > 1000:
                self._warned.clear()
            self._warned[z85_key] = now
            log.warning("CURVE: refused a peer with unknown public key %s", z85_key.decode(errors="replace"))
        return False


def start_authenticator(ctx: zmq.asyncio.Context, keys: CurveKeys, stats: dict) -> AsyncioAuthenticator:
    """Run the ZAP handler on ``ctx``; must happen before any CURVE server socket binds
    (without a ZAP handler libzmq would admit every client that knows the server key)."""
    auth = AsyncioAuthenticator(ctx, log=logging.getLogger("mesh.wire.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(),  # the domain our servers set
                                  credentials_provider=KeyDirectory(keys.public_dir, stats))
    return auth


def from_config(cfg) -> CurveKeys | None:
    """This node's CURVE keys, or None when the links are plaintext (said loudly)."""
    sec = cfg.security
    if not sec.curve:
        log.warning("node links are PLAINTEXT (security.curve = false): anyone who can reach the "
                    "dispatchers' ZeroMQ ports can read every event and publish; use CURVE "
                    "(meshctl keys) outside local development")
        return None
    keys = CurveKeys(sec.curve_secret_key, sec.curve_public_keys)
    log.info("node links use CURVE (public key %s, allowed keys in %s)", keys.public.decode(),
             keys.public_dir)
    return keys


def secure_links(ctx: zmq.asyncio.Context, cfg, stats: dict) -> tuple[CurveKeys | None, AsyncioAuthenticator | None]:
    """A dispatcher's CURVE set-up: its keys and a running authenticator (both None when the
    links are plaintext)."""
    keys = from_config(cfg)
    return keys, (start_authenticator(ctx, keys, stats) if keys is not None else None)
