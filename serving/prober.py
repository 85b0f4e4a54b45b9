"""The hang probe of the server's watchdog (serving/health.py): a 1-step request through each model.

A Python stub that hangs alive (SIGSTOP, a deadlock in a native library) keeps its process,
and Triton keeps saying the model is ready; only a request notices. So every `interval_s`
the prober sends, one after another, a 1-image 1-step request to every model the server
has (for each name: the ensemble `NAME`, which runs `NAME_sampler` and, with bls,
`NAME_jump`; `NAME_jump` directly, one jump from t_max to t_end on zeros; `NAME_stream`, one
step; a class-conditional model class 0), each with a deadline of `deadline_s`. A model
misses a probe when the probe fails and Triton's statistics show no request of that model
answered meanwhile: a busy server whose queue makes the probe late is not hung. `misses` misses in a row make the model hung
(`hung()`), and the watchdog restarts the server.

The probe's cost is three tiny requests per model every interval (docs/serving.md,
"One restart policy").
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewstep.serving.client import _wrap, build_inputs
from fewstep.serving.protocol import ModelInfo


@dataclass
class Target:
    """One model the prober sends requests to, and its record."""
    model: str
    kind: str           # "ensemble", "jump" or "stream"
    misses: int = 0     # in a row
    last_error: str = ""


def _success_count(client, model: str, timeout: float) -> int | None:
    """Requests of `model` answered successfully so far (Triton's statistics); None if unknown."""
    try:
        stats = client.get_inference_statistics(model, as_json=True, client_timeout=timeout)
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))
    except Exception:  # noqa: BLE001 - a server that cannot answer shows no progress
        return None


class Prober:
    """Probes the models of `names` (ensemble names) on a running server, in a thread.

    `client_factory()` returns a new tritonclient.grpc client for the server (its TLS
    settings included); `repo` is the model repository (the jump probe's times are read from
    its warm-up files). pause() / resume() bracket a restart; resume() forgets earlier misses.
    """

    def __init__(self, client_factory, repo: Path, names: list[str], interval_s: float = 2.0,
                 deadline_s: float = 2.0, misses: int = 2):
        import tritonclient.grpc as grpc

        self.grpc = grpc
        self.client_factory = client_factory
        self.repo = Path(repo)
        self.interval_s, self.deadline_s, self.max_misses = interval_s, deadline_s, misses
        self.targets = [Target(n + sfx, kind) for n in names
                        for sfx, kind in (("", "ensemble"), ("_jump", "jump"), ("_stream", "stream"))
                        if (self.repo / (n + sfx) / "config.pbtxt").is_file()]
        # what each probe sends: from the manifest the repository keeps beside the sampler
        self.info = {n: ModelInfo.from_manifest(json.loads((self.repo / (n + "_sampler") / "1" / "manifest.json")
                                                           .read_text()), n) for n in names}
        self.sent = 0                    # probes sent, every model together
        self.seconds: list[float] = []   # latency of every probe that was answered
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _label(self, name: str):
        """Class 0 for a class-conditional model, None otherwise."""
        return [0] if self.info[name].num_classes else None

    # --- the thread ---------------------------------------------------------------------------
    def start(self) -> "Prober":
        self._thread = threading.Thread(target=self._loop, name="fewstep-prober", daemon=True)
        self._thread.start()
        return self

    def close(self, wait: float = 0.0) -> None:
        """Stop probing. The thread ends after the probe it may be sending; by default not waited
        for, so that a SIGTERM's drain starts at once."""
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join(wait)

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        with self._lock:
            for t in self.targets:
                t.misses, t.last_error = 0, ""
        self._paused.clear()

    def hung(self) -> list[Target]:
        """The models that missed `misses` probes in a row."""
        with self._lock:
            return [t for t in self.targets if t.misses >= self.max_misses]

    def _loop(self) -> None:
        client = None
        while not self._stop.wait(self.interval_s):
            if self._paused.is_set():
                continue
            if client is None:
                client = self.client_factory()
            for target in self.targets:
                if self._stop.is_set() or self._paused.is_set():
                    break
                before = _success_count(client, target.model, self.deadline_s)
                error = self.probe(client, target)
                progressed = error is not None and before is not None and \
                    (_success_count(client, target.model, self.deadline_s) or 0) > before
                with self._lock:
                    if self._paused.is_set():
                        break
                    if error is None or progressed:
                        target.misses, target.last_error = 0, ""
                    else:
                        target.misses += 1
                        target.last_error = error
        if client is not None:
            client.close()

    # --- one probe ------------------------------------------------------------------------------
    def probe(self, client, target: Target) -> str | None:
        """Send one probe; None when it was answered in time, else what went wrong."""
        self.sent += 1
        t0 = time.monotonic()
        try:
            if target.kind == "ensemble":
                inputs = build_inputs(self.grpc, [0], 1, class_labels=self._label(target.model))
                client.infer(target.model, inputs, outputs=[self.grpc.InferRequestedOutput("sample")],
                             client_timeout=self.deadline_s)
            elif target.kind == "jump":
                client.infer(target.model, self._jump_inputs(target.model), client_timeout=self.deadline_s)
            else:
                self._stream(client, target.model)
        except Exception as e:  # noqa: BLE001 - any failure is a miss
            err = _wrap(e)
            return f"{err.code} {err.message[:120]}"
        self.seconds.append(time.monotonic() - t0)
        return None

    def _jump_inputs(self, model: str) -> list:
        """One jump on zeros from t_max to t_end."""
        info = self.info[model[:-len("_jump")]]
        arrays = {"x": np.zeros((1, *info.shape), np.float32),
                  "t": np.full((1, 1), info.spec["t_max"], np.float32),
                  "s": np.full((1, 1), info.spec["t_end"], np.float32)}
        if info.num_classes:
            arrays["class_label"] = np.zeros((1, 1), np.int64)
        inputs = []
        for key, arr in arrays.items():
            inp = self.grpc.InferInput(key, list(arr.shape), "INT64" if key == "class_label" else "FP32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs

    def _stream(self, client, model: str) -> None:
        name = model[:-len("_stream")]
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)),
                            stream_timeout=self.deadline_s)
        try:
            inputs = build_inputs(self.grpc, [0], 1, batched=False, class_labels=self._label(name))
            client.async_stream_infer(model, inputs, enable_empty_final_response=True)
            deadline = time.monotonic() + self.deadline_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{model}: no final response in {self.deadline_s:g} s")
                try:
                    result, error = answers.get(timeout=left)
                except queue.Empty:
                    raise TimeoutError(f"{model}: no final response in {self.deadline_s:g} s") from None
                if error is not None:
                    raise error
                params = result.get_response().parameters
                if "triton_final_response" in params and params["triton_final_response"].bool_param:
                    return
        finally:
            client.stop_stream(cancel_requests=True)
