"""Consistency trajectory models (Kim et al. 2023) distilled from an EDM teacher.

The jump G_theta(x_t, t, s) = f(t, s) x_t + g(t, s) D_theta(x_t, t, s) (a two-time net; the
`ctm` preconditioning f = s/t, g = 1 - s/t is CTM's own, `analytic` is Analytic-Precond).
One training step, on a Karras grid t_0 = T > ... > t_{N-1} = eps:
  pick t = t_i, k teacher Heun steps (p(k) ~ k, k <= heun_steps) down to u = t_{i+k},
  s uniformly among t_{i+k} .. t_{N-1}, and
    L_ctm = d( G_tgt(G_theta(x_t, t, s), s, eps), G_tgt(G_tgt(x_u, u, s), s, eps) )
  (G_tgt: the EMA target, no gradient to its weights; its input carries the student's
  gradient in the first term), plus the denoising term on the diagonal s = t,
    L_dsm = E w(sigma) |D_theta(x + sigma n, sigma, sigma) - x|^2   (EDM's sigma and weight),
  loss = L_ctm + dsm_weight * L_dsm. The student starts as the teacher; the target is
  updated at the start of each loss() (see ConsistencyBase.update_target).
Sampling: the shared loop's deterministic jumps (gamma = 0), gamma-sampling, or 1 step
(G(x_T, T, eps)).
"""
from __future__ import annotations

import torch

from training.methods.base import bcast
from training.methods.cd import ConsistencyBase


class CTM(ConsistencyBase):
    name = "ctm"
    jump_lands = "s"
    two_times = True
    defaults = {
        **ConsistencyBase.common_defaults,
        "precond": "ctm",
        "target_ema": 0.999,
        "heun_steps": 17,        # most teacher Heun steps from t to u (sony/ctm: N - 1)
        "dsm_weight": 1.0,
        "p_mean": -1.2,          # EDM's noise distribution for the DSM term
        "p_std": 1.2,
        "gamma": 0.0,            # default sampler stochasticity (0 = deterministic)
    }

    def __init__(self, opts=None, teacher=None):
        super().__init__(opts, teacher)
        from fewstep.errors import UserError
        if not 0.0 <= float(self.opts["gamma"]) <= 1.0:
            raise UserError(f"method.gamma must be in [0, 1], got {self.opts['gamma']!r}")
        if not (isinstance(self.opts["heun_steps"], int) and self.opts["heun_steps"] >= 1):
            raise UserError(f"method.heun_steps must be an integer >= 1, got {self.opts['heun_steps']!r}")

    def G(self, net, x, t, s, labels=None):
        f, g = self._precond().coeffs(t, s)
        return bcast(f, x) * x + bcast(g, x) * self.denoise(net, x, t, s, labels)

    def jump(self, net, x, t, s, labels=None):
        return self.G(net, x, t, s, labels)

    def sample_times(self, b, device):
        """Indices (i, u, j) of t, u, s on the descending grid, and the grid."""
        grid = self.grid(device).flip(0)                      # T ... eps
        n = grid.shape[0]
        i = torch.randint(0, n - 1, (b,), device=device)
        kmax = torch.clamp(n - 1 - i, max=int(self.opts["heun_steps"]))
        ks = torch.arange(1, int(self.opts["heun_steps"]) + 1, device=device, dtype=torch.float32)
        w = torch.where(ks[None, :] <= kmax[:, None], ks[None, :], torch.zeros_like(ks)[None, :])
        k = torch.multinomial(w, 1).squeeze(1) + 1
        u = i + k
        j = u + (torch.rand(b, device=device) * (n - u).to(torch.float32)).long().clamp(max=n - 1 - u)
        return i, u, j, grid

    @torch.no_grad()
    def teacher_solve(self, x, i, u, grid, labels=None):
        """Teacher Heun steps along the grid from index i to u (per sample)."""
        x = x.clone()
        steps = u - i
        for m in range(int(steps.max())):
            act = (steps > m).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            lab = None if labels is None else labels[act]
            a, c = grid[i[act] + m], grid[i[act] + m + 1]
            x[act] = self.teacher_heun(x[act], a.to(x.dtype), c.to(x.dtype), lab)
        return x

    def loss(self, net, x, labels, progress=0.0):
        o = self.opts
        self.update_target(net)
        b = x.shape[0]
        i, ui, j, grid = self.sample_times(b, x.device)
        t, u, s = (grid[k].to(x.dtype) for k in (i, ui, j))
        eps = torch.full_like(t, float(o["sigma_min"]))
        x_t = x + bcast(t, x) * torch.randn_like(x)
        target_net = self._target(x.device)
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, i, ui, grid, labels)
            tgt = self.G(target_net, self.G(target_net, x_u, u, s, labels), s, eps, labels)

        # DSM batch on the diagonal s = t, evaluated in the same forward as the CTM batch.
        sigma = (torch.randn(b, device=x.device) * o["p_std"] + o["p_mean"]).exp()
        sigma = sigma.clamp(float(o["sigma_min"]), float(o["sigma_max"])).to(x.dtype)
        x_n = x + bcast(sigma, x) * torch.randn_like(x)
        lab2 = None if labels is None else torch.cat([labels, labels])
        D = self.denoise(net, torch.cat([x_t, x_n]), torch.cat([t, sigma]), torch.cat([s, sigma]), lab2)
        D_ctm, D_dsm = D[:b], D[b:]
        f, g = self._precond().coeffs(t, s)
        x_s = bcast(f, x) * x_t + bcast(g, x) * D_ctm
        pred = self.G(target_net, x_s, s, eps, labels)
        loss_ctm = self.distance(pred, tgt).mean()
        sd = float(o["sigma_data"])
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss_dsm = (bcast(weight, x) * (D_dsm - x) ** 2).mean()
        loss = loss_ctm + float(o["dsm_weight"]) * loss_dsm
        return loss, {"loss": loss.item(), "ctm": loss_ctm.item(), "dsm": loss_dsm.item()}
