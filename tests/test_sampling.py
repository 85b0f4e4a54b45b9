import math

import numpy as np
import pytest
import torch

from fewstep import sampling


def test_flow_grid_is_uniform_from_1_to_0():
    g = sampling.time_grid(sampling.flow_spec(), 4)
    np.testing.assert_allclose(g, [1.0, 0.75, 0.5, 0.25, 0.0])


def test_karras_grid_by_hand():
    spec = sampling.ve_spec()
    g1 = sampling.time_grid(spec, 1)
    np.testing.assert_allclose(g1, [80.0, 0.0])
    g2 = sampling.time_grid(spec, 2)
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    np.testing.assert_allclose(g2, [80.0, mid, 0.0])
    g8 = sampling.time_grid(spec, 8)
    assert len(g8) == 9 and np.all(np.diff(g8) < 0) and g8[0] == 80.0 and g8[-1] == 0.0
    assert g8[-2] > 0.002  # no step is spent between t_min and 0


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_grid_rejects_bad_steps(steps):
    with pytest.raises(ValueError):
        sampling.time_grid(sampling.flow_spec(), steps)


def test_landing_time_gamma_limits():
    spec = sampling.ve_spec(t_end=0.002)
    assert sampling.landing_time(spec, 5.0, 0.0) == pytest.approx(5.0)
    assert sampling.landing_time(spec, 5.0, 1.0) == pytest.approx(0.002)
    mid = sampling.landing_time(spec, 5.0, 0.6)
    assert mid == pytest.approx(0.8 * (5.0 - 0.002) + 0.002)


def test_noise_depends_only_on_own_seed():
    a = sampling.noise([3, 7, 11], 2, (1, 4, 4))
    b = sampling.noise([11, 99], 2, (1, 4, 4))
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(sampling.noise([3], 1, (4,)), sampling.noise([3], 2, (4,)))
    with pytest.raises(ValueError):
        sampling.noise([-1], 0, (2,))


def test_renoise_keeps_marginals():
    # flow: x_s = (1-s) x + s z  ->  x_t must have std sqrt((1-t)^2 var_x + t^2)
    rng = np.random.default_rng(0)
    n = 200_000
    x0 = rng.standard_normal(n) * 0.5
    s, t = 0.2, 0.7
    xs = (1 - s) * x0 + s * rng.standard_normal(n)
    xt = sampling.renoise("flow", xs, s, t, rng.standard_normal(n))
    assert np.std(xt) == pytest.approx(math.sqrt((1 - t) ** 2 * 0.25 + t ** 2), rel=0.01)
    xv = sampling.renoise("ve", x0, 1.0, 3.0, rng.standard_normal(n))
    assert np.std(xv) == pytest.approx(math.sqrt(0.25 + 9.0 - 1.0), rel=0.01)


def _gaussian_jump(sd):
    """Exact PF-ODE flow of VE data ~ N(0, sd^2): x_s = x_t sqrt(sd^2+s^2)/sqrt(sd^2+t^2)."""
    def jump(x, t, s):
        r = ((sd ** 2 + s ** 2) / (sd ** 2 + t ** 2)) ** 0.5
        return x * r.reshape((-1,) + (1,) * (x.ndim - 1))
    return jump


def test_exact_jump_gives_same_sample_for_any_step_count_numpy_and_torch():
    sd = 0.5
    spec = sampling.ve_spec()
    seeds = [0, 1, 2]
    z = sampling.noise(seeds, 0, (1, 2, 2))
    expected = z * 80.0 * sd / math.sqrt(sd ** 2 + 80.0 ** 2)
    for steps in (1, 2, 5):
        out_np = sampling.sample(_gaussian_jump(sd), spec, steps, seeds, (1, 2, 2))
        assert isinstance(out_np, np.ndarray)
        np.testing.assert_allclose(out_np, expected, rtol=1e-5, atol=1e-6)
        out_t = sampling.sample(_gaussian_jump(sd), spec, steps, seeds, (1, 2, 2), like_x=torch.zeros(1))
        assert torch.is_tensor(out_t)
        np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5, atol=1e-6)


def test_stochastic_sampling_uses_per_step_noise_and_keeps_distribution():
    sd = 0.5
    spec = sampling.ve_spec()
    seeds = list(range(4000))
    det = sampling.sample(_gaussian_jump(sd), spec, 3, seeds, (1,), gamma=0.0)
    sto = sampling.sample(_gaussian_jump(sd), spec, 3, seeds, (1,), gamma=1.0)
    assert not np.allclose(det, sto)
    assert np.std(sto) == pytest.approx(sd, rel=0.05)
    again = sampling.sample(_gaussian_jump(sd), spec, 3, seeds[:5], (1,), gamma=1.0)
    np.testing.assert_array_equal(again, sto[:5])  # batch composition does not matter


def test_jump_lands_end_forces_renoise():
    calls = []

    def jump(x, t, s):
        calls.append((float(t[0]), float(s[0])))
        return x * 0  # a consistency model: always lands at t_end
    spec = sampling.ve_spec(t_end=0.002, jump_lands="end")
    out = sampling.sample(jump, spec, 3, [0, 1], (2,), gamma=0.0)
    assert [s for _, s in calls[:-1]] == pytest.approx([0.002, 0.002])
    assert np.all(out == 0)


def test_check_request_limits():
    spec = sampling.flow_spec(max_steps=8)
    assert sampling.check_request(spec, 8) == 0.0
    for bad in (0, 9, -2, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            sampling.check_request(spec, bad)
    for g in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            sampling.check_request(spec, 2, g)


def test_to_uint8_maps_range_and_layout():
    x = np.array([[[[-1.0, 0.0], [1.0, 2.0]]]], dtype=np.float32)  # [1,1,2,2]
    img = sampling.to_uint8(x)
    assert img.shape == (1, 2, 2, 1) and img.dtype == np.uint8
    assert img[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
