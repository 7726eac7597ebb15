"""Every merge method's output bits are pinned (see golden_hashes.py): a refactor must not move one."""

from __future__ import annotations

import json

import golden_hashes


def test_every_method_gives_the_recorded_bits_in_memory_and_streamed():
    want = json.loads(golden_hashes.RECORD.read_text())
    now = golden_hashes.compute()
    assert set(now["in_memory"]) == set(want["in_memory"]), "a method was added or removed: re-record"
    changed = [(kind, k) for kind in want for k in want[kind] if now[kind][k] != want[kind][k]]
    assert not changed, f"outputs changed: {changed}"
