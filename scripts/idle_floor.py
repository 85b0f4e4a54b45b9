"""What a request costs after the server has been idle: the floor of serving on this host.

    PYTHONPATH=$PWD python scripts/idle_floor.py --export /tmp/models/cud_fmnist --gaps 0,0.5,2,5,20

Starts `fewstep serve`'s server on the export (no watchdog) and, for each gap, sends
`--requests` calls one at a time, each after sleeping `gap` ms: a request the sampler
refuses in execute() (seed -1: gRPC client, server, ensemble, one round trip into a stub),
gRPC ServerReady (client and server, no stub), and, as a control, a one-byte echo between
two processes over a Unix socket. p50 latency in ms per call, and the
CPU per refused request of the client and the server's processes (/proc).

At one request at a time the server's threads sleep through each jump (4-15 ms for the
shipped models on this host), so the refusal after a gap that long is the floor a real
request pays (docs/PERFORMANCE.md, "Serving overhead on a fast jump").
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import numpy as np

from fewstep.serving.client import Client, ServingError
from fewstep.serving.reaper import cpu_seconds
from fewstep.serving.repository import Options
from fewstep.serving.session import served


def echo_pair():
    """(call, close): a one-byte round trip to a forked process over a Unix socket pair."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo process
        a.close()
        while data := b.recv(64):
            b.send(data)
        os._exit(0)
    b.close()

    def call():
        a.send(b"x")
        a.recv(64)

    def close():
        a.close()
        os.waitpid(pid, 0)

    return call, close


def timed(fn, n: int, gap_s: float, pids=()) -> tuple[float, float, float]:
    """(p50 ms, client CPU ms per call, server CPU ms per call) of n calls, each after gap_s idle."""
    lat = []
    cpu0, srv0 = time.process_time(), cpu_seconds(pids)
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return (float(np.median(lat)) * 1e3, (time.process_time() - cpu0) * 1e3 / n,
            (cpu_seconds(pids) - srv0) * 1e3 / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="an exported model dir")
    ap.add_argument("--gaps", default="0,0.5,2,5,20", help="idle ms before each call, comma-separated")
    ap.add_argument("--requests", type=int, default=200, help="calls per gap and kind (default 200)")
    args = ap.parse_args()
    gaps = [float(g) for g in args.gaps.split(",")]
    server, written = served([args.export], Options(), grpc_port=0, http_port=0, metrics_port=0)
    model = written[0]["name"]
    echo, close_echo = echo_pair()
    with server, Client(server.grpc_url) as client:
        def refused():
            try:
                client.infer(model, [-1], 1, outputs=("image",))
            except ServingError as e:
                assert e.code == "INVALID_ARGUMENT", e

        kinds = {"refused request (gRPC)": refused, "gRPC ServerReady": client.ready,
                 "Unix socket echo (control)": echo}
        for fn in kinds.values():  # warm
            timed(fn, 20, 0.0)
        load0 = os.getloadavg()[0]
        print("| idle before each call, ms | " + " | ".join(f"{g:g}" for g in gaps) + " |")
        print("|---" * (len(gaps) + 1) + "|")
        cpu_rows = {}
        for name, fn in kinds.items():
            cells = []
            for g in gaps:
                p50, c_cpu, s_cpu = timed(fn, args.requests, g / 1e3, server.pids() if fn is refused else ())
                cells.append(f"{p50:.3f}")
                if fn is refused:
                    cpu_rows.setdefault("refused: CPU of the client, ms", []).append(f"{c_cpu:.2f}")
                    cpu_rows.setdefault("refused: CPU of the server's processes, ms", []).append(f"{s_cpu:.2f}")
            print(f"| {name}: p50 ms | " + " | ".join(cells) + " |")
        for name, cells in cpu_rows.items():
            print(f"| {name} | " + " | ".join(cells) + " |")
    close_echo()
    print(f"\n{model}, {args.requests} calls per cell; load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
