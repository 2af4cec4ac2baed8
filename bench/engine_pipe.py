"""What the engine process's pipe costs: one Step message of K token events, from the engine process's
Outbox to the server's reader, against the step times it rides on.

A child process (spawned, as the engine process is) builds K TokenEvents per step and encodes them as
`Outbox` does (core_process.py) and sends them; the parent receives and decodes them into TokenEvents as
`EngineClient._deliver` does (core_client.py). Reported per step and per event: the
child's encode time, the parent's decode time, and the round through the pipe (child send -> parent
decoded), median of --steps steps at each K.

    .venv/bin/python bench/engine_pipe.py                      # K = 1, 32, 128, 256; ~10 s
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.core_protocol import Step, encoder, from_engine  # noqa: E402
from server.engine.request import TokenEvent  # noqa: E402


def child(conn: Connection, sizes: list[int], steps: int) -> None:
    for k in sizes:
        for step in range(steps):
            events = [TokenEvent(f"chat-{i:032x}", 0, 1000 + step, " word", prompt_tokens=45) for i in range(k)]
            started = time.perf_counter()
            data = encoder.encode(Step(events))
            encoded = time.perf_counter()
            conn.send_bytes(struct.pack("dd", encoded - started, time.time()) + data)
            time.sleep(0.002)  # steps are milliseconds apart
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,32,128,256", help="events per step")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    sizes = [int(k) for k in args.sizes.split(",")]
    context = multiprocessing.get_context("spawn")
    parent, child_end = context.Pipe()
    process = context.Process(target=child, args=(child_end, sizes, args.steps), daemon=True)
    process.start()
    child_end.close()
    print(
        f"{'events/step':>11} | {'encode us':>9} | {'decode us':>9} | {'send->decoded us':>16} | {'bytes':>7} | per event us"
    )
    for k in sizes:
        encode, decode, transit, size = [], [], [], 0
        for _ in range(args.steps):
            raw = parent.recv_bytes()
            took, sent = struct.unpack("dd", raw[:16])
            data = raw[16:]
            started = time.perf_counter()
            step = from_engine.decode(data)
            assert isinstance(step, Step)
            events = step.events
            assert len(events) == k
            done = time.perf_counter()
            encode.append(took)
            decode.append(done - started)
            transit.append(time.time() - sent)
            size = len(data)
        e, d, t = (statistics.median(x) * 1e6 for x in (encode, decode, transit))
        print(f"{k:>11} | {e:>9.1f} | {d:>9.1f} | {t:>16.1f} | {size:>7} | {(e + d) / k:.2f}")
    process.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
