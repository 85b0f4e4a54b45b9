"""EDM (Karras et al. 2022): a preconditioned denoiser D(x, sigma), the diffusion teacher."""
from __future__ import annotations

import torch

from fewstep import sampling
from fewstep.training.methods.base import Method, bcast, ode_step


def edm_precond(sigma: torch.Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise of EDM's denoiser D = c_skip x + c_out F(c_in x, c_noise)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1 / (sigma ** 2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoise(net, x, sigma, sigma_data: float, labels=None, **net_kw):
    """EDM's preconditioned denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) of a raw
    net F (net_kw: extra net inputs, e.g. a two-time net's s)."""
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, sigma_data)
    F = net(bcast(c_in, x) * x, c_noise, class_labels=labels, **net_kw)
    return bcast(c_skip, x) * x + bcast(c_out, x) * F


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float):
    """EDM's denoising loss weight (sigma^2 + sd^2) / (sigma sd)^2 (= 1 / c_out^2)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def pf_ode_velocity(denoise):
    """The probability-flow ODE dx/dt = (x - D(x, t)) / t of a denoiser D(x, t) (VE, t = sigma)."""
    return lambda x, t: (x - denoise(x, t)) / bcast(t, x)


class EDM(Method):
    name = "edm"
    sample_options = ("solver",)
    defaults = {
        "sigma_data": sampling.EDM_SIGMA_DATA,
        "p_mean": -1.2,
        "p_std": 1.2,
        "sigma_min": sampling.EDM_T_MIN,
        "sigma_max": sampling.EDM_T_MAX,
        "rho": sampling.EDM_RHO,
        "solver": "heun",  # heun | euler; Heun's last step (to sigma = 0) is Euler
        "max_steps": 64,
        "default_steps": 8,
    }

    def denoise(self, net, x, sigma, labels=None):
        return edm_denoise(net, x, sigma, self.opts["sigma_data"], labels)

    def loss(self, net, x, labels, progress=0.0):
        o = self.opts
        sigma = (torch.randn(x.shape[0], device=x.device) * o["p_std"] + o["p_mean"]).exp()
        weight = edm_loss_weight(sigma, o["sigma_data"])
        n = torch.randn_like(x) * bcast(sigma, x)
        D = self.denoise(net, x + n, sigma, labels)
        loss = (bcast(weight, x) * (D - x) ** 2).mean()
        return loss, {"loss": loss.item()}

    def ode_step(self, denoiser, x, t, s):
        """One Euler or Heun step (method.solver) of the PF-ODE dx/dt = (x - D(x, t)) / t from t to s."""
        return ode_step(pf_ode_velocity(denoiser), x, t, s, heun=self.opts["solver"] == "heun")

    def jump(self, net, x, t, s, labels=None):
        return self.ode_step(lambda y, u: self.denoise(net, y, u, labels), x, t, s)

    def sampler_spec(self):
        o = self.opts
        return sampling.ve_spec(t_max=o["sigma_max"], t_min=o["sigma_min"], rho=o["rho"],
                                max_steps=o["max_steps"], default_steps=o["default_steps"])
