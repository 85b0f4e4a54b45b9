"""Rectified flow: x_t = t z + (1 - t) x, the net predicts v* = z - x (the flow baseline)."""
from __future__ import annotations

import torch

from fewstep import sampling
from fewstep.training.methods.base import Method, bcast, ode_step


class RectifiedFlow(Method):
    name = "rf"
    sample_options = ("solver",)
    defaults = {
        "eps": 1e-5,          # t ~ U(eps, 1), as the CUD authors train their flows
        "time_scale": 999.0,  # the net embeds t * time_scale: positional embeddings want a wide range
        "solver": "euler",    # euler | heun (heun: 2 net calls per step, Euler on the last step)
        "max_steps": 64,
        "default_steps": 8,
    }

    def velocity(self, net, x, t, labels=None):
        return net(x, t * self.opts["time_scale"], class_labels=labels)

    def loss(self, net, x, labels, progress=0.0):
        eps = self.opts["eps"]
        t = torch.rand(x.shape[0], device=x.device) * (1 - eps) + eps
        z = torch.randn_like(x)
        xt = bcast(t, x) * z + (1 - bcast(t, x)) * x
        loss = ((self.velocity(net, xt, t, labels) - (z - x)) ** 2).mean()
        return loss, {"loss": loss.item()}

    def jump(self, net, x, t, s, labels=None):
        return ode_step(lambda y, u: self.velocity(net, y, u, labels), x, t, s, heun=self.opts["solver"] == "heun")

    def sampler_spec(self):
        return sampling.flow_spec(max_steps=self.opts["max_steps"], default_steps=self.opts["default_steps"])
