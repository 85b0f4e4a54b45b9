"""Where a request's time goes inside `<name>_sampler`, for profiling (off unless asked for).

With FEWSTEP_SAMPLER_TRACE=PREFIX in the server's environment, each sampler stub appends one
JSON line per answered request to PREFIX.<pid>.jsonl: time.perf_counter() stamps of its
stages (execute entered, queued, first tick, answered, response built, sent) and the seconds
its ticks spent preparing the batch, in the jump and settling (serving.scheduler stamps
those). `stage_means` turns the lines into milliseconds per request for each stage;
scripts/profile_sampler.py prints them beside py-spy's view and the CPU of each process.
"""
from __future__ import annotations

import json
import os
import threading
import time

ENV = "FEWSTEP_SAMPLER_TRACE"

# (stage, how its seconds come from one record); the stages add up to sent - exec
STAGES = (
    ("execute: read inputs, validate, queue", lambda r: r["queued"] - r["exec"]),
    ("wait for the scheduler's thread", lambda r: r["tick"] - r["queued"]),
    ("ticks: batch (start noise, stack)", lambda r: r["batch_s"]),
    ("ticks: jump (ONNX Runtime)", lambda r: r["jump_s"]),
    ("ticks: settle (re-noise, results)", lambda r: r["settle_s"]),
    ("between ticks (loop, other requests)",
     lambda r: r["done"] - r["tick"] - r["batch_s"] - r["jump_s"] - r["settle_s"]),
    ("hand-off to the responder thread", lambda r: r["answer"] - r["done"]),
    ("build the response (images, PNG, tensors)", lambda r: r["built"] - r["answer"]),
    ("send (a round trip to the server)", lambda r: r["sent"] - r["built"]),
)
TOTAL = "in the stub in all (execute to sent)"


class Tracer:
    """Stamps and writes the traced requests of one stub (thread-safe)."""

    def __init__(self, prefix: str):
        self.path = f"{prefix}.{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "Tracer | None":
        prefix = os.environ.get(ENV)
        return cls(prefix) if prefix else None

    @staticmethod
    def stamp(trace: dict | None, stage: str) -> None:
        if trace is not None:
            trace[stage] = time.perf_counter()

    def write(self, trace: dict) -> None:
        line = json.dumps(trace) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)


def read_traces(paths) -> list[dict]:
    """The complete records of trace files (one JSON object a line)."""
    out = []
    for path in paths:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if all(k in rec for k in ("exec", "queued", "tick", "done", "answer", "built", "sent")):
                    out.append(rec)
    return out


def stage_means(records: list[dict], trim: float = 0.05) -> dict:
    """{stage: ms per request} over the records, plus TOTAL and "requests": means (so that the
    stages add up to the total) over the requests whose total lies between its `trim` and
    1 - `trim` quantiles (a shared host preempts a few requests for far longer than the
    rest take)."""
    totals = sorted(r["sent"] - r["exec"] for r in records)
    if not totals:
        return {"requests": 0}
    lo, hi = totals[int(trim * (len(totals) - 1))], totals[int((1 - trim) * (len(totals) - 1))]
    kept = [r for r in records if lo <= r["sent"] - r["exec"] <= hi]
    n = len(kept)
    out = {name: sum(f(r) for r in kept) * 1e3 / n for name, f in STAGES}
    out[TOTAL] = sum(r["sent"] - r["exec"] for r in kept) * 1e3 / n
    out["requests"] = n
    return out
