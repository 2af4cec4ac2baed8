"""The start-up heap frozen out of garbage collection (server/gc_heap.py), in a process of its own so the
test runner's heap is left alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import gc, json, time
from server.gc_heap import freeze_start_up_heap
keep = [{"n": i, "self": None} for i in range(200_000)]
for d in keep:
    d["self"] = d  # cycles, like a loaded library's objects
def full_collection_ms():
    started = time.perf_counter(); gc.collect(); return (time.perf_counter() - started) * 1e3
before = min(full_collection_ms() for _ in range(3))
frozen = freeze_start_up_heap("probe")
after = min(full_collection_ms() for _ in range(3))
garbage = {"x": None}; garbage["x"] = garbage; del garbage  # allocated after the freeze: still collected
print(json.dumps({"before": before, "after": after, "frozen": frozen, "freed": gc.collect()}))
"""


def test_frozen_start_up_objects_leave_full_collections_and_later_garbage_is_still_collected() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["frozen"] >= 200_000
    assert result["after"] < result["before"] / 4, result  # the 200,000 dicts are no longer walked
    assert result["freed"] >= 1  # a cycle made after the freeze is found and freed
