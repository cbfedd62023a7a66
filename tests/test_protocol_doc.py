"""The documents hold what they promise.

* docs/PROTOCOL.md's owner function, implemented here from its words alone (``hashlib.blake2b``
  directly, not the mesh's ownership code), gives the mesh's order for random dispatcher names
  and videos, Unicode included, and its table of examples is right.
* README.md stays a short user's document, and every link in README.md and docs/*.md leads to
  a file (and heading) of this repository: no link leaves it.
"""

from __future__ import annotations

import hashlib
import os
import random
import re

from mesh.core import ownership

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 300


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return fh.read()


def _documents() -> list[str]:
    docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    return ["README.md", *docs]


# --- the owner function, as docs/PROTOCOL.md "Ownership" words it ---------------------------------

def doc_weight(dispatcher: str, video: str) -> int:
    """Steps 1-3: UTF-8 name, one zero byte, UTF-8 video; BLAKE2b with an 8-byte digest; the
    digest as an unsigned 64-bit big-endian integer."""
    data = dispatcher.encode("utf-8") + b"\x00" + video.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    value = 0
    for byte in digest:  # the first byte is the most significant
        value = value * 256 + byte
    return value


def doc_rank(video: str, dispatchers: list[str], weight=doc_weight) -> list[str]:
    """Highest weight first; equal weights: the larger name (code point order) first."""
    return sorted(dispatchers, key=lambda d: (weight(d, video), d), reverse=True)


#: characters names and videos are drawn from: ASCII, Latin-1, other scripts, astral emoji
ALPHABET = "abcXYZ019-_.:/ üßé東京дом🎉🚀\u200b"
VIDEO_ALPHABET = "abcdefXYZ0123456789._-"


def _random_name(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 24)))


def _random_video(rng: random.Random) -> str:
    if rng.random() < 0.5:  # a valid id: what the mesh hashes in practice
        return rng.choice("aZ7") + "".join(rng.choice(VIDEO_ALPHABET) for _ in range(rng.randint(0, 63)))
    return _random_name(rng)


def test_the_documented_owner_function_ranks_dispatchers_as_the_mesh_does():
    rng = random.Random(18)
    names = set()
    for _ in range(1000):
        dispatchers = list({_random_name(rng) for _ in range(rng.randint(1, 7))})
        names.update(dispatchers)
        video = _random_video(rng)
        for d in dispatchers:
            assert doc_weight(d, video) == ownership.weight(d, video), (d, video)
        order = doc_rank(video, dispatchers)
        assert order == ownership.rank(video, dispatchers), (video, dispatchers)
        assert order[0] == ownership.owner(video, dispatchers), (video, dispatchers)
    assert any(not n.isascii() for n in names) and any(ord(c) > 0xFFFF for n in names for c in n)


def test_equal_weights_rank_the_larger_name_first(monkeypatch):
    """64-bit weights never tie in practice, so the tie rule is checked with every weight equal."""
    names = ["dispatcher-1", "dispatcher-3", "Dispatcher-9", "dispätcher", "dispatcher-2"]
    monkeypatch.setattr(ownership, "weight", lambda d, v: 7)
    expected = doc_rank("v", names, weight=lambda d, v: 7)
    assert expected == ["dispätcher", "dispatcher-3", "dispatcher-2", "dispatcher-1", "Dispatcher-9"]
    assert ownership.rank("v", names) == expected
    assert ownership.owner("v", names) == expected[0]


def test_blake2b_with_an_8_byte_digest_is_not_blake2b_512_cut_short():
    data = b"dispatcher-1\x00launch-42"
    assert hashlib.blake2b(data, digest_size=8).digest() != hashlib.blake2b(data).digest()[:8]


def test_the_documents_example_table_is_what_the_mesh_computes():
    text = _read("docs/PROTOCOL.md")
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| `([0-9a-f]{16})` \| (\d+) \|$", text, re.M)
    assert len(rows) >= 4, "docs/PROTOCOL.md lost its table of owner examples"
    for dispatcher, video, digest, weight in rows:
        data = f"{dispatcher}\x00{video}".encode("utf-8")
        assert hashlib.blake2b(data, digest_size=8).hexdigest() == digest, (dispatcher, video)
        assert ownership.weight(dispatcher, video) == int(weight) == doc_weight(dispatcher, video)
    example = [d for d, v, _, _ in rows if v == "launch-42"]
    assert ownership.rank("launch-42", example) == ["dispatcher-2", "dispatcher-1", "dispatcher-3"]
    assert "order for `launch-42` is `dispatcher-2` (owner), `dispatcher-1`\n(backup), `dispatcher-3`" in text
    wrong = hashlib.blake2b(b"dispatcher-1\x00launch-42").hexdigest()[:16]
    assert f"`{wrong}`: the wrong answer" in text
