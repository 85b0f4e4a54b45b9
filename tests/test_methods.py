"""rf and edm: losses against hand computations with fake networks, and their jumps."""
import math

import pytest
import torch

from fewstep.training.methods.edm import EDM, edm_precond
from fewstep.training.methods.rf import RectifiedFlow


class ScaledIdentity(torch.nn.Module):
    """F(x, t) = a * x: a 'network' whose loss can be written down exactly."""

    def __init__(self, a=1.0):
        super().__init__()
        self.a = a
        self.calls = []

    def forward(self, x, t, s=None, class_labels=None):
        self.calls.append(t.detach().clone())
        return self.a * x


def test_rf_loss_by_hand():
    m = RectifiedFlow()
    net = ScaledIdentity(1.0)
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    torch.manual_seed(0)
    loss, logs = m.loss(net, x, None)
    torch.manual_seed(0)
    t = torch.rand(2) * (1 - 1e-5) + 1e-5
    z = torch.randn(2, 2)
    # v = x_t = t z + (1-t) x; target z - x  =>  residual (t-1) z + (2-t) x
    tt = t[:, None]
    expected = (((tt - 1) * z + (2 - tt) * x) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["loss"] == pytest.approx(loss.item())
    # the net sees t scaled by time_scale
    assert torch.allclose(net.calls[0], t * 999.0)


def test_rf_euler_and_heun_jump():
    net = ScaledIdentity(2.0)  # v = 2 x: exact flow x_s = x_t exp(2 (s - t))
    x = torch.ones(1, 1)
    t, s = torch.tensor([1.0]), torch.tensor([0.5])
    e = RectifiedFlow().jump(net, x, t, s)
    assert e.item() == pytest.approx(1 + (-0.5) * 2)  # Euler: 0
    h = RectifiedFlow({"solver": "heun"}).jump(net, x, t, s)
    assert h.item() == pytest.approx(1 - 0.5 * 0.5 * (2 + 2 * 0.0))  # Heun: 0.5
    # Heun's last step (s = 0) is Euler
    h0 = RectifiedFlow({"solver": "heun"}).jump(net, x, torch.tensor([0.25]), torch.tensor([0.0]))
    assert h0.item() == pytest.approx(1 - 0.25 * 2)


def test_edm_precond_values():
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(0.5), 0.5)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in.item() == pytest.approx(1 / math.sqrt(0.5))
    assert c_noise.item() == pytest.approx(math.log(0.5) / 4)


def test_edm_loss_by_hand():
    m = EDM()
    net = ScaledIdentity(0.0)  # F = 0  =>  D = c_skip (x + n)
    x = torch.tensor([[1.0], [-0.5], [0.25]])
    torch.manual_seed(1)
    loss, _ = m.loss(net, x, None)
    torch.manual_seed(1)
    sigma = (torch.randn(3) * 1.2 - 1.2).exp()
    n = torch.randn(3, 1) * sigma[:, None]
    sd = 0.5
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    expected = (w[:, None] * (c_skip[:, None] * (x + n) - x) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_edm_heun_is_exact_for_gaussian_data_denoiser():
    """With the exact denoiser of N(0, sd^2) data, the ODE step matches the exact flow closely."""
    sd = 0.5
    m = EDM({"solver": "heun"})

    def exact(x, t):
        return x * (sd ** 2 / (sd ** 2 + t ** 2))[:, None]
    x = torch.tensor([[3.0]], dtype=torch.float64)
    t, s = torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.9], dtype=torch.float64)
    out = m.ode_step(exact, x, t, s)
    ref = x * math.sqrt((sd ** 2 + 1.9 ** 2) / (sd ** 2 + 4.0))
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    # Euler to sigma = 0 returns the denoiser's output
    last = m.ode_step(exact, x, t, torch.tensor([0.0], dtype=torch.float64))
    assert last.item() == pytest.approx(exact(x, t).item())


def test_unknown_method_option_is_rejected():
    with pytest.raises(KeyError, match="bogus"):
        RectifiedFlow({"bogus": 1})
