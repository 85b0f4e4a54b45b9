"""EDM (Karras et al. 2022): a preconditioned denoiser D(x, sigma), the diffusion teacher."""
from __future__ import annotations

import torch

from training import sampling
from training.methods.base import Method, bcast


def edm_precond(sigma: torch.Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise of EDM's denoiser D = c_skip x + c_out F(c_in x, c_noise)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1 / (sigma ** 2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDM(Method):
    name = "edm"
    sample_options = ("solver",)
    defaults = {
        "sigma_data": 0.5,
        "p_mean": -1.2,
        "p_std": 1.2,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
        "solver": "heun",  # heun | euler; Heun's last step (to sigma = 0) is Euler
        "max_steps": 64,
        "default_steps": 8,
    }

    def denoise(self, net, x, sigma, labels=None):
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.opts["sigma_data"])
        F = net(bcast(c_in, x) * x, c_noise, class_labels=labels)
        return bcast(c_skip, x) * x + bcast(c_out, x) * F

    def loss(self, net, x, labels, progress=0.0):
        o = self.opts
        sigma = (torch.randn(x.shape[0], device=x.device) * o["p_std"] + o["p_mean"]).exp()
        weight = (sigma ** 2 + o["sigma_data"] ** 2) / (sigma * o["sigma_data"]) ** 2
        n = torch.randn_like(x) * bcast(sigma, x)
        D = self.denoise(net, x + n, sigma, labels)
        loss = (bcast(weight, x) * (D - x) ** 2).mean()
        return loss, {"loss": loss.item()}

    def ode_step(self, denoiser, x, t, s):
        """One Euler or Heun step of the PF-ODE dx/dt = (x - D(x, t)) / t from t to s."""
        h = bcast(s - t, x)
        d = (x - denoiser(x, t)) / bcast(t, x)
        x_euler = x + h * d
        if self.opts["solver"] != "heun":
            return x_euler
        s_safe = torch.where(s > 0, s, torch.ones_like(s))  # no division by 0 on the last step
        d2 = (x_euler - denoiser(x_euler, s_safe)) / bcast(s_safe, x)
        return torch.where(bcast(s, x) > 0, x + h * 0.5 * (d + d2), x_euler)

    def jump(self, net, x, t, s, labels=None):
        return self.ode_step(lambda y, u: self.denoise(net, y, u, labels), x, t, s)

    def sampler_spec(self):
        o = self.opts
        return sampling.ve_spec(t_max=o["sigma_max"], t_min=o["sigma_min"], rho=o["rho"],
                                max_steps=o["max_steps"], default_steps=o["default_steps"])
