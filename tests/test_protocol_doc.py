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
# --- the documents' shape and links ---------------------------------------------------------

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]*)\)")
_AUTOLINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^>\s]*)>", re.I)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def links_of(text: str) -> list[str]:
    """Inline link targets and autolinks of a Markdown text, outside code blocks and spans."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    return _LINK.findall(prose) + _AUTOLINK.findall(prose)


def anchors_of(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to -."""
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        out.add(slug.replace(" ", "-"))
    return out


def test_links_in_the_documents_stay_in_the_repository_and_resolve():
    problems = []
    for doc in _documents():
        text = _read(doc)
        here = os.path.dirname(os.path.join(ROOT, doc))
        for target in links_of(text):
            path, _, anchor = target.partition("#")
            if not target or _SCHEME.match(target) or target.startswith("/"):
                problems.append(f"{doc}: {target!r} is not a relative link into the repository")
                continue
            resolved = os.path.realpath(os.path.join(here, path)) if path else os.path.join(ROOT, doc)
            if os.path.commonpath([resolved, os.path.realpath(ROOT)]) != os.path.realpath(ROOT):
                problems.append(f"{doc}: {target!r} points outside the repository")
            elif not os.path.exists(resolved):
                problems.append(f"{doc}: {target!r} does not exist")
            elif anchor and resolved.endswith(".md"):
                with open(resolved, encoding="utf-8") as fh:
                    if anchor not in anchors_of(fh.read()):
                        problems.append(f"{doc}: {target!r} names no heading of {os.path.relpath(resolved, ROOT)}")
    assert not problems, "\n".join(problems)


def test_the_link_check_sees_what_it_must_refuse():
    text = ("[a](../shared/DESIGN.md) [b](https://example.org/) <http://x.example> "
            "`[c](http://in-code.example)`\n```\n[d](http://in-fence.example)\n```\n")
    assert links_of(text) == ["../shared/DESIGN.md", "https://example.org/", "http://x.example"]
    assert "local-topologies-mesh-up" in anchors_of("## Local topologies (mesh-up)\n")
    assert "node-links-zeromq-curve" in anchors_of("## Node links: ZeroMQ CURVE\n")


def test_the_readme_is_short():
    lines = _read("README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; details belong in docs/"
