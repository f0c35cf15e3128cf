"""The header rewrite's fast path must agree with the full tokenizer."""

from __future__ import annotations

import random

import pytest

from postwell.cleanup import addresses as A


def _slow(value: str) -> str | None:
    tree = A.group_addresses(A.tokenize(value))
    changed = False
    for t in tree:
        if t.kind != "addr" or not t.parts:
            continue
        old = A._ext_token(t)
        new = A.rewrite_local(old, "example.org")
        if new != old:
            changed = True
            t.parts = A.tokenize(new)
    return A.externalize(tree) if changed else None


@pytest.mark.parametrize("value", [
    " <a@b.c>", "a@b.c", " John Doe <j.x@ex-ample.org>", "a@b.c, d@e.f", " <a@b.c>,\n\t<d@e>",
    " <a@b.>", " a@", " user", " a!b", " x%y@z", ' "q" <a@b>', " a@b.c (c)", " G: a@b;",
    " a@[1.2.3.4]", " a..b@c", " .a@b", " a@b..c", " Jo <a@b.c> x", " a@b.c,", " <user>",
])
def test_fast_path_agrees(value):
    assert A.rewrite_header_value(value, "example.org") == _slow(value)


def test_fast_path_agrees_on_generated_lists():
    rnd = random.Random(5)
    words = ["a", "b.c", "x-y", "John", "Doe", "ex.org", "ex.org.", "host", "u_1"]
    for _ in range(3000):
        items = []
        for _ in range(rnd.randint(1, 3)):
            local = rnd.choice(words)
            dom = rnd.choice(words + [""])
            addr = f"{local}@{dom}" if rnd.random() < 0.8 else local
            if rnd.random() < 0.5:
                phrase = " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 2)))
                addr = f"{phrase} <{addr}>" if phrase else f"<{addr}>"
            items.append(addr)
        value = " " + rnd.choice([",", ", ", ",\n\t"]).join(items)
        assert A.rewrite_header_value(value, "example.org") == _slow(value), value
