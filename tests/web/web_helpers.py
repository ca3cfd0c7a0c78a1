"""Helpers for the web tests (a module of its own so importing it runs no conftest code twice)."""

from __future__ import annotations

import json
import re
from typing import Any

EXAMPLE_MANIFEST = """\
version: 1
name: web-test
model: tiny
priority: 5
tags: [test]
defaults: {candidates: 3, steps: 2, size: 64x64, seed: 7}
items:
  - "a red fox in the snow"
  - prompt: "a lighthouse at dusk"
    size: 64x96
  - template: "a {animal} astronaut"
    vars: {animal: [cat, dog]}
selection: {winners: 1}
"""

#: A PDQ hash for the blocklists the tests upload.
PDQ_HASH = "ab" * 32

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def queued_messages(client: Any, queue: str) -> list[dict[str, Any]]:
    """Every message waiting in ``queue`` and its priority sub-queues (kombu names them ``queue:N``)."""
    keys = [k.decode() for k in client.keys(f"{queue}*")]
    keys = [k for k in keys if k == queue or re.fullmatch(rf"{re.escape(queue)}:\d+", k)]
    out = []
    for key in keys:
        out += [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    return out


def csrf_from(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)
