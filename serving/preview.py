"""Previews of a running sampler: the denoised estimate after each step.

The state the sampler carries between steps is noisy (pure noise early in a run); what a
person wants to watch is where the run is heading: the denoised estimate, the jump from the
step's starting state straight to the end of the trajectory, `jump(x_t, t, t_end)`. For a
consistency model (and any step whose jump already lands at the end: gamma 1, the last
step) that is the step's own output, before re-noising, so it costs nothing; otherwise it
is one more jump call. Step 1's estimate is the 1-step image of the same seed and the last
one is the final image, so a preview sharpens from the one to the other.

Plain numpy, no Triton: `<name>_stream` uses it, and unit tests run it on a toy jump.
"""
from __future__ import annotations

import numpy as np


def estimate_previews(jump, t_end: float, on_estimate):
    """Wrap a jump(x, t, s, labels) so that each sampler step reports its denoised estimate.

    Returns (jump, callback) to hand to the sampler loop (`serving.protocol.run_group`):
    after step i, `on_estimate(i, x0_hat)` gets float32 [B, ...] estimates.
    """
    last: dict = {}
    end = np.float32(t_end)

    def recording_jump(x, t, s, labels):
        out = jump(x, t, s, labels)
        last.update(x=x, t=t, s=s, labels=labels, out=out)
        return out

    def on_step(i, _state):
        s = np.asarray(last["s"])
        if np.all(s == end):
            est = last["out"]
        else:
            est = jump(last["x"], last["t"], np.full(s.shape, end, dtype=np.float32), last["labels"])
        on_estimate(i, np.asarray(est, dtype=np.float32))

    return recording_jump, on_step
