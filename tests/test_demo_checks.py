"""What the page shows and checks before anything is sent (demo/checks.py, demo/app.py's texts),
without a browser or a server: the unit half of the demo's tests (tests/test_demo.py has the page
in a real browser)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest


# --- unit: what the page shows --------------------------------------------------------------------

def test_display_images_scale_and_grey():
    from fewstep.demo.checks import display_images

    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1)
    out = display_images(imgs)
    assert len(out) == 2 and out[0].shape == (168, 168)          # 6x nearest neighbour, >= 160
    assert np.array_equal(out[1][::6, ::6], imgs[1, :, :, 0])
    rgb = display_images(np.zeros((1, 32, 32, 3), np.uint8))
    assert rgb[0].shape == (160, 160, 3)


def _meta(name="m", classes=0, max_steps=64, default=2, gamma=0.0, method="rf", lands="s", made=(), quality=None):
    from fewstep.serving.client import ModelMeta
    from fewstep.training.methods import method_class
    return ModelMeta(name, (1, 28, 28), classes, max_steps, default, 16, gamma, ("image",), method, lands,
                     tuple(made), quality, gamma_sampling=method_class(method).gamma_sampling)


QUALITY = {"metric": "fid-classifier", "num": 1000, "by_steps": {1: 192.58, 2: 153.72, 4: 170.3, 8: 8.25}}


def test_messages_and_controls():
    from fewstep.demo.checks import class_names, describe_error, gamma_applies, model_info, steps_note
    from fewstep.serving.client import ServingError

    down = ServingError("UNAVAILABLE", "failed to connect to all addresses")
    assert "unreachable at `h:1`" in describe_error(down, "h:1")
    assert describe_error(down, "h:1", markdown=False).startswith("Triton is unreachable at h:1")
    bad = ServingError("INVALID_ARGUMENT", "steps: must be an integer in [1, 64], got 99")
    assert "rejected" in describe_error(bad, "h:1") and "got 99" in describe_error(bad, "h:1")
    meta = _meta(classes=10, max_steps=16, default=4, method="ctm")
    assert gamma_applies(meta)
    assert not gamma_applies(_meta(gamma=1.0, method="cd", lands="end"))
    assert not gamma_applies(_meta(method="cud"))
    # the method's flag, not its name: a gamma-sampling method under another name shows the control
    assert gamma_applies(dataclasses.replace(_meta(method="cud"), gamma_sampling=True))
    manifest = {"training": {"config": {"data": {"name": "fmnist"}}}}
    assert class_names(meta, manifest)[9] == "Ankle boot"
    assert class_names(meta, None)[3] == "class 3"
    text = model_info(meta)
    assert "10 classes" in text and "accepts 1–16" in text and "made for **4 steps**" in text and "FID" not in text
    # the figures of the manifest's eval (results keyed `fid`, metric named by its features)
    cud = _meta("cud_fmnist", default=1, method="cud-distill", made=(1,), quality=QUALITY)
    text = model_info(cud)
    assert "made for **1 step**" in text
    assert "FID by steps (fid-classifier, 1000 samples, lower is better)" in text
    assert "**1 → 192.6** (made for) · 2 → 153.7 · 4 → 170.3 · 8 → 8.25" in text
    assert steps_note(cud, 1) == "FID 192.6 at 1 step"
    assert steps_note(cud, 2) == "FID 153.7 at 2 steps; cud_fmnist was made for 1 step (FID 192.6 at 1 step)"
    assert steps_note(cud, 3) == "cud_fmnist was made for 1 step (FID 192.6 at 1 step)"


def test_step_counts_offered():
    """The default is one of the counts the model was made for; compare shows those and the
    evaluated ones (1, 2, 4, 8 only when that leaves fewer than two)."""
    from fewstep.demo.app import steps_hint
    from fewstep.demo.checks import compare_steps

    assert compare_steps(_meta(default=8)) == [1, 2, 4, 8]
    assert compare_steps(_meta(default=1, made=(1,), quality=QUALITY)) == [1, 2, 4, 8]
    assert compare_steps(_meta(default=2, made=(1, 2, 16))) == [1, 2, 16]
    assert compare_steps(_meta(max_steps=3, default=2, made=(2,))) == [1, 2]
    assert steps_hint(_meta("cd", default=2, made=(1, 2, 4, 8))).startswith("cd was made for **1, 2, 4 or 8 steps**")


def test_request_checks_say_what_is_wrong():
    """Nothing is rounded or clamped: out-of-range or fractional values are refused with a message."""
    from fewstep.demo.checks import BadInput, check_request

    m = _meta(default=2)
    r = check_request(m, None, 5, 3)
    assert (r.steps, r.seeds, r.label, r.gamma) == (2, [5, 6, 7], None, None)
    assert check_request(m, 64.0).steps == 64
    for steps, msg in ((1000, "steps must be a whole number in [1, 64], got 1000"), (0, "got 0"),
                       (2.5, "got 2.5"), ("x", "got 'x'"), ("", "steps is empty")):
        with pytest.raises(BadInput, match=re.escape(msg)):
            check_request(m, steps)
    with pytest.raises(BadInput, match=r"number of images must be a whole number in \[1, 16\], got 17"):
        check_request(m, 2, 0, 17)
    with pytest.raises(BadInput, match="seed must be"):
        check_request(m, 2, -1)
    with pytest.raises(BadInput, match="m is unconditional; send no class label"):
        check_request(m, 2, 0, 1, label=3)
    cond = _meta(classes=10)
    with pytest.raises(BadInput, match=r"class label is required .* \[0, 9\]"):
        check_request(cond, 2)
    assert check_request(cond, 2, label=9).label == 9
    with pytest.raises(BadInput, match="gamma has no effect at 1 step"):
        check_request(m, 1, gamma=0.5)
    with pytest.raises(BadInput, match="consistency model"):
        check_request(_meta("cm", lands="end", gamma=1.0), 2, gamma=0.5)
    with pytest.raises(BadInput, match=r"gamma must be a number in \[0, 1\], got 1.5"):
        check_request(m, 2, gamma=1.5)
    assert check_request(m, 2, gamma=0.5).gamma == 0.5


def test_previews_are_denoised_estimates():
    """serving.preview on the shared sampler loop: the estimate after step 1 is the 1-step image
    of the seed, the last is the final image; a jump that lands at the end costs no extra call."""
    from fewstep.serving.preview import estimate_previews
    from fewstep.serving.protocol import Item, ModelInfo, run_group
    from fewstep import sampling

    calls = []

    def jump(x, t, s, labels):  # a flow whose denoiser is 0.5 x: an Euler step of its velocity
        calls.append(1)
        t, s = t.reshape(-1, 1), s.reshape(-1, 1)
        v = (x - 0.5 * x) / t
        return (x + (s - t) * v).astype(np.float32)

    for spec, extra in ((sampling.flow_spec(), True), (sampling.flow_spec(jump_lands="end", gamma=1.0), False)):
        info = ModelInfo("toy", (3,), 0, spec, 8)
        frames = []
        calls.clear()
        wrapped, on_step = estimate_previews(jump, spec["t_end"], lambda i, x: frames.append((i, x.copy())))
        items = [Item(seed=4, steps=4, gamma=sampling.check_request(spec, 4))]
        final = run_group(wrapped, info, items, callback=on_step)
        one = run_group(jump, info, [Item(4, 1, sampling.check_request(spec, 1))])
        assert [i for i, _ in frames] == [0, 1, 2, 3]
        np.testing.assert_allclose(frames[0][1], one, rtol=1e-6)
        np.testing.assert_array_equal(frames[-1][1], final)
        assert len(calls) - 1 == (4 + 3 if extra else 4)  # `one` made one call
        # a frame is the denoiser's output at the state the step started from, not that (noisy) state
        states = []
        sampling.sample(lambda x, t, s: jump(x, t, s, None), spec, 4, [4], (3,), gamma=items[0].gamma,
                        callback=lambda i, x: states.append(np.array(x)))
        np.testing.assert_allclose(frames[1][1], 0.5 * states[0], rtol=1e-5)
        assert not np.allclose(frames[1][1], states[0])
