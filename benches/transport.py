"""How a submit travels to the writer: the segment's request area against a
Unix socket, measured as the round trip of a ~100-byte request and its answer
between two processes, without any database work.

    python benches/transport.py [--n 20000]

The request area is what headrace uses (see engine/api.py and
engine/writer.py); this script is the measurement behind that choice.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from typing import List

from engine import shm
from engine.shm import Segment

MSG = b"x" * 100


def _area_consumer(name: str, n: int) -> None:
    seg = Segment.attach(name)
    shm.set_wait_spin(200)  # as the writer does
    pos = seg.req_bounds()[0]
    done = 0
    while done < n:
        seen = seg.event(shm.EV_WRITER)
        h = seg.req_next(pos)
        if h is None or h.state != shm.REQ_READY:
            if h is not None and h.state == shm.REQ_RESERVED:
                continue
            seg.wait(shm.EV_WRITER, seen, 1.0)
            continue
        seg.req_answer(h.pos, seg.req_read(h.pos, h.nbytes))
        seg.notify(shm.EV_COMMIT)
        pos = h.pos + h.len
        seg.req_reclaim(pos)
        done += 1
    os._exit(0)


def request_area(n: int, spin_us: int) -> List[float]:
    name = f"transport-{os.getpid()}"
    Segment.unlink(name)
    seg = Segment.create(name, 64, req_bytes=1 << 20)
    pid = os.fork()
    if pid == 0:
        _area_consumer(name, n)
    shm.set_wait_spin(spin_us)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            pos = seg.req_reserve(len(MSG))
            while pos is None:
                time.sleep(0)
                pos = seg.req_reserve(len(MSG))
            seg.req_write(pos, MSG)
            seg.req_publish(pos)
            while True:
                seen = seg.event(shm.EV_COMMIT)
                h = seg.req_get(pos)
                if h.state == shm.REQ_ANSWERED:
                    break
                seg.wait(shm.EV_COMMIT, seen, 1.0)
            seg.req_read(pos, h.nbytes)
            seg.req_set_state(pos, shm.REQ_DONE)
            times.append(time.perf_counter() - t)
    finally:
        os.waitpid(pid, 0)
        seg.close()
        Segment.unlink(name)
    return times


def unix_socket(n: int) -> List[float]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        a.close()
        for _ in range(n):
            b.send(b.recv(4096))
        os._exit(0)
    b.close()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        a.send(MSG)
        a.recv(4096)
        times.append(time.perf_counter() - t)
    os.waitpid(pid, 0)
    a.close()
    return times


def _row(label: str, times: List[float]) -> str:
    times = sorted(times)
    p50 = times[len(times) // 2] * 1e6
    p99 = times[int(len(times) * 0.99)] * 1e6
    return f"| {label} | {p50:.1f} | {p99:.1f} | {len(times) / sum(times):,.0f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"# {a.n} round trips of {len(MSG)} bytes, {a.reps} repetitions; the median repetition is shown")
    print("| transport | p50 us | p99 us | round trips/s |")
    print("|---|---|---|---|")
    cases = [("request area, waiter spins 100 us", lambda: request_area(a.n, 100)),
             ("request area, no spin (futex only)", lambda: request_area(a.n, 0)),
             ("Unix socketpair (SEQPACKET)", lambda: unix_socket(a.n))]
    for label, fn in cases:
        reps = [fn() for _ in range(a.reps)]
        reps.sort(key=lambda t: statistics.median(t))
        print(_row(label, reps[len(reps) // 2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
