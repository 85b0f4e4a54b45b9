"""`<name>_sampler`: the N-step sampler, batched per step across every request (a Python model).

execute() validates every request (a bad one gets INVALID_ARGUMENT at once, the others go
on) and hands its images to this instance's scheduler (`serving.scheduler`), then returns
without waiting; except when the scheduler is idle and every image takes one step: then
execute() runs that one jump call itself and returns the responses (no hand-off to another
thread, and no response sender's round trip to the server). The scheduler's thread
advances every sample in flight, whatever its step count, progress, gamma or label, with
one jump call per tick; a request is answered through its response sender as soon as its
last image is done (by a responder thread when samples are still in flight, so building
PNGs overlaps the next jump; by the scheduler's own thread when nothing else waits), and
new requests join at the next tick.

The jump is ONNX Runtime in this process (jump_mode "inline") or BLS requests to
`<name>_jump` (jump_mode "bls"); see serving.models.common.make_jump. A sample's noise
depends only on its own seed (`fewstep.sampling.noise`), so an image does not depend on
what else shares its batch. The instance is warm before Triton marks it ready.
"""
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fewstep.serving.models.common import JumpCounters, LocalJump, internal, invalid, load_info, make_jump, read_inputs
from fewstep.serving.protocol import InvalidInput, encode_png, parse_request, to_images
from fewstep.serving.scheduler import Scheduler
from fewstep.serving.trace import Tracer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.cfg, params, self.info = load_info(args)
        self.jump = make_jump(args, params, self.info)
        self.max_images = int(self.cfg.get("max_batch_size", 0)) or self.info.max_batch
        self.outputs = [o["name"] for o in self.cfg["output"]]
        # one thread answers finished requests (images, PNG, send) while the scheduler jumps on
        self.responder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="respond")
        self.counters = None
        self.tracer = Tracer.from_env()  # FEWSTEP_SAMPLER_TRACE: per-request timings (profiling)
        try:
            self.counters = JumpCounters(lambda: getattr(self, "scheduler", None), self.cfg["name"],
                                         args.get("model_instance_name", ""))
        except Exception as e:  # noqa: BLE001 - metrics off (--allow-metrics=false): serve without them
            pb_utils.Logger.log_warn(f"sampler: no jump counters ({e})")
        self.scheduler = Scheduler(self.jump, self.info, max_batch=int(params.get("jump_max_batch", 0) or
                                                                        self.info.max_batch),
                                   on_idle=self.counters.flush if self.counters else None,
                                   name=f"{self.cfg['name']}-scheduler", trace=self.tracer is not None)
        self._warm()

    def _warm(self):
        """Before Triton marks the instance ready: run every batch size an in-process jump will
        see, and start the responder thread with a response built (images, PNG). With the jump
        inline, Triton's model_warmup then sends one request through execute(), the scheduler
        and the response sender; with bls the jump warms in `<name>_jump` (which may not be
        loaded yet when this runs)."""
        if isinstance(self.jump, LocalJump):
            self.jump.warm(self.info)
        x = np.zeros((1,) + tuple(self.info.shape), np.float32)
        self.responder.submit(self._response, x, set(self.outputs)).result()

    def execute(self, requests):
        entered = time.perf_counter() if self.tracer else 0.0
        parsed = []  # (request, items or the InvalidInput, wanted outputs, trace)
        for request in requests:
            try:
                items = parse_request(self.info, read_inputs(request), self.max_images)
            except InvalidInput as e:
                items = e
            wanted = set(request.requested_output_names()) or set(self.outputs)
            trace = {"exec": entered, "queued": time.perf_counter()} if self.tracer else None
            parsed.append((request, items, wanted, trace))
        valid = [(items, trace) for _, items, _, trace in parsed if not isinstance(items, InvalidInput)]
        # 1-step requests meeting an idle scheduler: one jump here, and the responses go back
        # with this return (no response sender: no round trip to the server per response)
        results = self.scheduler.run_here([v[0] for v in valid], [v[1] for v in valid]) if valid else None
        if results is not None:
            done = iter(results)
            return [invalid(items) if isinstance(items, InvalidInput) else self._build(next(done), wanted, trace)
                    for _, items, wanted, trace in parsed]
        for request, items, wanted, trace in parsed:
            sender = request.get_response_sender()
            if isinstance(items, InvalidInput):
                sender.send(invalid(items), flags=FINAL)
            else:
                self.scheduler.submit(items, functools.partial(self._finished, sender, wanted, trace), trace)
        return None

    def _finished(self, sender, wanted, trace, result):
        """Called by the scheduler thread: with samples still in flight, the responder builds
        and sends the answer while the next jump runs; otherwise this thread answers at once
        (a hand-off to another thread would only add its wake-up to the latency)."""
        Tracer.stamp(trace, "done")
        if self.scheduler.has_work():
            try:
                self.responder.submit(self._answer, sender, wanted, result, trace)
                return
            except RuntimeError:  # the responder is shutting down: answer here
                pass
        self._answer(sender, wanted, result, trace)

    def _answer(self, sender, wanted, result, trace=None):
        try:
            response = self._build(result, wanted, trace, sending=True)
            sender.send(response, flags=FINAL)
            if trace is not None:
                Tracer.stamp(trace, "sent")
                self.tracer.write(trace)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"sampler: could not send a response: {e}")

    def _build(self, result, wanted, trace=None, sending=False):
        """The response to a finished request (its samples, or the exception that failed it)."""
        Tracer.stamp(trace, "answer")
        if trace is not None and "done" not in trace:
            trace["done"] = trace["answer"]
        if isinstance(result, BaseException):
            response = internal(f"sampler failed: {type(result).__name__}: {result}")
        else:
            response = self._response(result, wanted)
        Tracer.stamp(trace, "built")
        if trace is not None and not sending:  # returned from execute(): no send of its own
            trace["sent"] = trace["built"]
            self.tracer.write(trace)
        return response

    def _response(self, x, wanted):
        outs = []
        if "sample" in wanted and "sample" in self.outputs:
            outs.append(pb_utils.Tensor("sample", x))
        if self.info.is_image and ({"image", "png"} & wanted):
            imgs = to_images(self.info, x)
            if "image" in wanted:
                outs.append(pb_utils.Tensor("image", imgs))
            if "png" in wanted and "png" in self.outputs:
                pngs = np.array([[encode_png(im)] for im in imgs], dtype=np.object_)
                outs.append(pb_utils.Tensor("png", pngs))
        return pb_utils.InferenceResponse(output_tensors=outs)

    def finalize(self):
        # requests in flight are finished (up to 10 s); the rest hear that the server stops
        self.scheduler.stop(timeout=10.0)
        self.responder.shutdown(wait=True)
