"""`<name>_sampler`: the N-step sampler loop over `<name>_jump` (a Python BLS model).

execute() validates every request (a bad one gets INVALID_ARGUMENT at once, the others go
on), pools the images of all its requests, groups them by (steps, gamma) and hands each
group to a worker thread that runs `training.sampling.sample` (the same loop as PyTorch)
with one batched BLS jump call per step. execute() returns without waiting: each
request's response is sent through its response sender as soon as its images are done,
so a 1-step request never waits behind an 8-step one, and new requests start while
older loops run. Jump calls of concurrent groups meet in `<name>_jump`'s dynamic batcher.

A sample's noise depends only on its own seed (`training.sampling.noise`), so an image
does not depend on what else shares its batch.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.models.common import internal, invalid, load_info, make_jump, read_inputs
from serving.protocol import InvalidInput, encode_png, group_items, parse_request, run_group, to_images

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Job:
    """One request in flight: its items, results so far, and its response sender."""

    def __init__(self, sender, items, wanted):
        self.sender = sender
        self.items = items
        self.wanted = wanted
        self.results = [None] * len(items)
        self.remaining = len(items)
        self.done = False
        self.lock = threading.Lock()

    def fail(self, response):
        with self.lock:
            if self.done:
                return
            self.done = True
        self.sender.send(response, flags=FINAL)

    def put(self, k, x) -> bool:
        """Store image k; True when this was the last one missing."""
        with self.lock:
            if self.done:
                return False
            self.results[k] = x
            self.remaining -= 1
            if self.remaining == 0:
                self.done = True
                return True
            return False


class TritonPythonModel:
    def initialize(self, args):
        self.cfg, params, self.info = load_info(args)
        self.jump = make_jump(args, params, self.info)
        self.max_images = int(self.cfg.get("max_batch_size", 0)) or self.info.max_batch
        self.outputs = [o["name"] for o in self.cfg["output"]]
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("workers", "8") or 8),
                                       thread_name_prefix="sampler")
        # images waiting for a worker, by (steps, gamma): a worker takes all of a key's waiting
        # images as one loop, so requests that queue while the workers are busy share a batch
        self.pending: dict = {}
        self.pending_lock = threading.Lock()

    def execute(self, requests):
        jobs = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                items = parse_request(self.info, read_inputs(request), self.max_images)
            except InvalidInput as e:
                sender.send(invalid(e), flags=FINAL)
                continue
            wanted = set(request.requested_output_names()) or set(self.outputs)
            jobs.append(_Job(sender, items, wanted))
        flat = [(job, k) for job in jobs for k in range(len(job.items))]
        groups = group_items([job.items[k] for job, k in flat])
        # largest step counts first: they take longest
        for key in sorted(groups, key=lambda k: -k[0]):
            with self.pending_lock:
                self.pending.setdefault(key, []).extend(flat[i] for i in groups[key])
            self.pool.submit(self._drain, key)
        return None

    def _drain(self, key):
        """Run whatever images of `key` are waiting (nothing, when an earlier task took them)."""
        while True:
            with self.pending_lock:
                members = self.pending.pop(key, [])
                if len(members) > self.max_images:
                    # one loop runs at most a max batch; the rest waits for the next task
                    self.pending[key] = members[self.max_images:]
                    members = members[:self.max_images]
            if not members:
                return
            try:
                if key in self.pending:
                    self.pool.submit(self._drain, key)
                    key = None
            except RuntimeError:  # the pool is shutting down: this worker does the rest
                pass
            self._run(members)
            if key is None:
                return

    def _run(self, members):
        try:
            x = run_group(self.jump, self.info, [job.items[k] for job, k in members])
        except Exception as e:  # noqa: BLE001 - every request of the group hears of it
            msg = f"sampler failed: {type(e).__name__}: {e}"
            for job, _ in members:
                job.fail(internal(msg))
            return
        for i, (job, k) in enumerate(members):
            if job.put(k, x[i]):
                try:
                    job.sender.send(self._response(job), flags=FINAL)
                except Exception as e:  # noqa: BLE001
                    pb_utils.Logger.log_error(f"sampler: could not send a response: {e}")

    def _response(self, job):
        x = np.stack(job.results).astype(np.float32)
        outs = []
        if "sample" in job.wanted and "sample" in self.outputs:
            outs.append(pb_utils.Tensor("sample", x))
        if self.info.is_image and ({"image", "png"} & job.wanted):
            imgs = to_images(self.info, x)
            if "image" in job.wanted:
                outs.append(pb_utils.Tensor("image", imgs))
            if "png" in job.wanted and "png" in self.outputs:
                pngs = np.array([[encode_png(im)] for im in imgs], dtype=np.object_)
                outs.append(pb_utils.Tensor("png", pngs))
        return pb_utils.InferenceResponse(output_tensors=outs)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
