"""`<name>_stream`: a decoupled model that streams a preview after every sampler step.

One request = one image (seed, steps, optional class_label and gamma, as for `<name>`).
It gets `steps` responses, each with `image` (uint8 [H, W, C]; `sample` float32 for 2-D
models) and `step` (1..steps). Each is the denoised estimate at that step
(`serving.preview`: the jump from the step's starting state to the end), not the noisy
state: the first is the 1-step image of the seed, the last is the final image (the same
bytes as `<name>` returns) and carries the final flag. The loop is `fewstep.sampling.sample`
with a callback; jumps are BLS calls to `<name>_jump`. Requests run on worker threads,
so one slow stream does not hold up the next.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fewstep.serving.models.common import LocalJump, internal, invalid, load_info, make_jump, read_inputs
from fewstep.serving.preview import estimate_previews
from fewstep.serving.protocol import InvalidInput, parse_request, run_group, to_images

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        self.cfg, params, self.info = load_info(args)
        self.jump = make_jump(args, params, self.info)
        if isinstance(self.jump, LocalJump):  # warm before ready (with bls, <name>_jump warms itself)
            self.jump.warm(self.info)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("workers", "8") or 8),
                                       thread_name_prefix="stream")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                items = parse_request(self.info, read_inputs(request), 1)
            except InvalidInput as e:
                sender.send(invalid(e), flags=FINAL)
                continue
            self.pool.submit(self._run, sender, items)
        return None

    def _run(self, sender, items):
        steps = items[0].steps

        def preview(i, x):
            if sender.is_cancelled():
                raise _Cancelled
            x = np.asarray(x, dtype=np.float32)
            outs = [pb_utils.Tensor("step", np.array([i + 1], dtype=np.int32))]
            if self.info.is_image:
                outs.append(pb_utils.Tensor("image", to_images(self.info, x)[0]))
            else:
                outs.append(pb_utils.Tensor("sample", x[0]))
            last = i + 1 == steps
            sender.send(pb_utils.InferenceResponse(output_tensors=outs), flags=FINAL if last else 0)

        jump, on_step = estimate_previews(self.jump, float(self.info.spec["t_end"]), preview)
        try:
            run_group(jump, self.info, items, callback=on_step)
        except _Cancelled:
            sender.send(flags=FINAL)
        except Exception as e:  # noqa: BLE001
            sender.send(internal(f"stream failed: {type(e).__name__}: {e}"), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
