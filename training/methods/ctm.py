"""Consistency trajectory models (Kim et al. 2023) distilled from an EDM teacher, trained as
sony/ctm trains them (`cm/karras_diffusion.py`, `cm/resample.py`, `cm/script_util.py`).

The jump G_theta(x_t, t, s) = f(t, s) x_t + g(t, s) D_theta(x_t, t, s) (a two-time net; the
`ctm` preconditioning f = s/t, g = 1 - s/t is CTM's own, `analytic` is Analytic-Precond).
One training step, on a Karras grid t_0 = T > ... > t_{N-1} = eps:
  * one number of teacher Heun steps k for the whole batch, P(k) proportional to k on
    1..min(heun_steps, N - 1) (sony/ctm `heun_step_strategy='weighted'`); then per sample the
    index of t uniformly among those where k steps fit (i <= N - 1 - k), u = t_{i+k}, and s
    uniformly among t_{i+k} .. t_{N-1} (`sample_s_strategy='uniform'`);
  * L_ctm = d( G_tgt(G_theta(x_t, t, s), s, eps), G_tgt(G_sg(x_u, u, s), s, eps) ), G_tgt the
    EMA target (no gradient to its weights; its input carries the student's gradient in the
    first term), G_sg the stop-gradient *online* net (`ctm_target_inner_type='model_sg'`;
    method.target_inner=ema uses the EMA target instead);
  * L_dsm = E w(sigma) |D_theta(x + sigma n, sigma, sigma) - x|^2 with EDM's weight and sigma
    half lognormal(p_mean, p_std), half Karras-uniform over the first `dsm_karras_mult` of the
    grid (sony/ctm `halflognormal`, `diffusion_mult = 0.7`);
  * loss = L_ctm + w L_dsm, w = |grad L_ctm| / (|grad L_dsm| + 1e-4) on the net's last layer
    weight (`apply_adaptive_weight`), clamped to [0, 1e4], or a fixed method.dsm_weight.
The target runs in the student's mode (train mode: the same dropout setting as the student,
as the references' target_model.train()); the teacher runs in eval mode. The student starts
as the teacher; the target is updated at the start of each loss() (see update_target).
Sampling: the shared loop's deterministic jumps (gamma = 0), gamma-sampling, or 1 step.
"""
from __future__ import annotations

import torch

from fewstep.errors import UserError
from fewstep import sampling
from fewstep.training.methods.base import bcast
from fewstep.training.methods.cd import ConsistencyBase, last_layer_weight
from fewstep.training.methods.edm import edm_loss_weight

ADAPTIVE_EPS = 1e-4        # sony/ctm calculate_adaptive_weight: |g1| / (|g2| + 1e-4), clamp [0, 1e4]
ADAPTIVE_MAX = 1e4


class CTM(ConsistencyBase):
    name = "ctm"
    gamma_sampling = True
    jump_lands = "s"
    two_times = True
    defaults = {
        **ConsistencyBase.common_defaults,
        "precond": "ctm",
        "target_ema": 0.999,
        "target_inner": "online",  # online (sony/ctm model_sg) | ema (the EMA target)
        "heun_steps": 17,          # most teacher Heun steps from t to u (sony/ctm: N - 1)
        "dsm_weight": "adaptive",  # adaptive (gradient-norm balance) or a fixed number
        "dsm_karras_mult": 0.7,    # Karras-uniform half of the DSM sigmas: this much of the grid from T
        "p_mean": -1.2,            # lognormal half of the DSM sigmas
        "p_std": 1.2,
        "gamma": 0.0,              # default sampler stochasticity (0 = deterministic)
        # how the net takes s: per-block (sony/ctm: every block's own affine_s, random init, not
        # from the teacher) | shared-zero (fewstep's first CTM: added to the t embedding through a
        # zero-initialised layer, so the student starts exactly as the teacher)
        "s_embedding": "per-block",
    }

    def __init__(self, opts=None, teacher=None):
        if opts is not None and "s_embedding" not in opts:
            opts = {**opts, "s_embedding": "shared-zero"}   # a config written before the option
        super().__init__(opts, teacher)
        o = self.opts
        if o["s_embedding"] not in ("per-block", "shared-zero"):
            raise UserError(f"method.s_embedding must be per-block or shared-zero, got {o['s_embedding']!r}")
        if not 0.0 <= float(o["gamma"]) <= 1.0:
            raise UserError(f"method.gamma must be in [0, 1], got {o['gamma']!r}")
        if not (isinstance(o["heun_steps"], int) and o["heun_steps"] >= 1):
            raise UserError(f"method.heun_steps must be an integer >= 1, got {o['heun_steps']!r}")
        if o["target_inner"] not in ("online", "ema"):
            raise UserError(f"method.target_inner must be online or ema, got {o['target_inner']!r}")
        w = o["dsm_weight"]
        if not (w == "adaptive" or (isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0)):
            raise UserError(f"method.dsm_weight must be 'adaptive' or a number >= 0, got {w!r}")
        if not 0.0 <= float(o["dsm_karras_mult"]) <= 1.0:
            raise UserError(f"method.dsm_karras_mult must be in [0, 1], got {o['dsm_karras_mult']!r}")
        self._interval = {"teacher_steps": [0.0, 0], "dsm_weight": [0.0, 0]}
        self._last_weight = 1.0

    def G(self, net, x, t, s, labels=None):
        f, g = self._precond().coeffs(t, s)
        return bcast(f, x) * x + bcast(g, x) * self.denoise(net, x, t, s, labels)

    def jump(self, net, x, t, s, labels=None):
        return self.G(net, x, t, s, labels)

    # --- the (t, k, s) law ------------------------------------------------------------------
    def kmax(self) -> int:
        return min(int(self.opts["heun_steps"]), int(self.opts["N"]) - 1)

    def k_probs(self) -> torch.Tensor:
        """P(k) for k = 1..kmax: proportional to k (sony/ctm `weighted`, multiplier 1)."""
        ks = torch.arange(1, self.kmax() + 1, dtype=torch.float64)
        return ks / ks.sum()

    def sample_times(self, b, device, generator=None):
        """k (one per batch) and per-sample indices (i, u = i + k, j) of t, u, s on the
        descending grid, and the grid."""
        grid = self.grid(device)                              # T ... eps
        n = grid.shape[0]
        k = int(torch.multinomial(self.k_probs(), 1, generator=generator)) + 1
        i = torch.randint(0, n - k, (b,), generator=generator).to(device)
        u = i + k
        # j uniform in [u, n - 1]: floor(U * (n - u)) + u
        j = u + (torch.rand(b, generator=generator).to(device) * (n - u).to(torch.float32)).long()
        j = torch.minimum(j, torch.full_like(j, n - 1))
        return k, i, u, j, grid

    @torch.no_grad()
    def teacher_solve(self, x, i, k, grid, labels=None):
        """k teacher Heun steps along the grid from index i (per sample) to i + k."""
        for m in range(k):
            a, c = grid[i + m], grid[i + m + 1]
            x = self.teacher_heun(x, a.to(x.dtype), c.to(x.dtype), labels)
        return x

    def dsm_sigmas(self, b, device, generator=None):
        """Half lognormal, half Karras-uniform (sony/ctm HalfLogNormalHalfUniformSampler)."""
        o = self.opts
        half = b // 2
        logn = (torch.randn(half, generator=generator) * float(o["p_std"]) + float(o["p_mean"])).exp()
        pos = torch.rand(b - half, generator=generator, dtype=torch.float64) * float(o["dsm_karras_mult"])
        kar = sampling.karras(pos, o["sigma_min"], o["sigma_max"], o["rho"])
        # not clamped (sony/ctm neither): the Karras half lies in [sigma_min, sigma_max] by
        # construction, the lognormal half may leave it, as in the reference
        return torch.cat([logn.double(), kar]).to(device)

    # --- the loss -------------------------------------------------------------------------------
    def loss(self, net, x, labels, progress=0.0):
        o = self.opts
        self.update_target(net)
        b = x.shape[0]
        k, i, ui, j, grid = self.sample_times(b, x.device)
        t, u, s = (grid[m].to(x.dtype) for m in (i, ui, j))
        eps = torch.full_like(t, float(o["sigma_min"]))
        x_t = x + bcast(t, x) * torch.randn_like(x)
        target_net = self._target(x.device)
        target_net.train(net.training)        # the student's dropout setting (references: target.train())
        inner_net = net if o["target_inner"] == "online" else target_net
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, i, k, grid, labels)
            tgt = self.G(target_net, self.G(inner_net, x_u, u, s, labels), s, eps, labels)

        # DSM batch on the diagonal s = t, evaluated in the same forward as the CTM batch.
        sigma = self.dsm_sigmas(b, x.device).to(x.dtype)
        x_n = x + bcast(sigma, x) * torch.randn_like(x)
        lab2 = None if labels is None else torch.cat([labels, labels])
        D = self.denoise(net, torch.cat([x_t, x_n]), torch.cat([t, sigma]), torch.cat([s, sigma]), lab2)
        D_ctm, D_dsm = D[:b], D[b:]
        f, g = self._precond().coeffs(t, s)
        x_s = bcast(f, x) * x_t + bcast(g, x) * D_ctm
        pred = self.G(target_net, x_s, s, eps, labels)
        loss_ctm = self.distance(pred, tgt).mean()
        weight = edm_loss_weight(sigma, float(o["sigma_data"]))
        loss_dsm = (bcast(weight, x) * (D_dsm - x) ** 2).flatten(1).mean(1).mean()
        w = self.adaptive_weight(net, loss_ctm, loss_dsm) if o["dsm_weight"] == "adaptive" else float(o["dsm_weight"])
        loss = loss_ctm + w * loss_dsm
        self._note("teacher_steps", float(k))
        self._note("dsm_weight", float(w))
        return loss, {"loss": loss.item(), "ctm": loss_ctm.item(), "dsm": loss_dsm.item()}

    def adaptive_weight(self, net, loss_ctm, loss_dsm) -> float:
        """|d L_ctm / d W| / (|d L_dsm / d W| + 1e-4) on the last layer's weight W, clamped."""
        wl = last_layer_weight(net)
        if not (wl.requires_grad and loss_ctm.requires_grad and loss_dsm.requires_grad):
            return self._last_weight  # no graph (an evaluation under no_grad): the weight last in use
        g1 = torch.autograd.grad(loss_ctm, wl, retain_graph=True)[0]
        g2 = torch.autograd.grad(loss_dsm, wl, retain_graph=True)[0]
        self._last_weight = float((g1.norm() / (g2.norm() + ADAPTIVE_EPS)).clamp(0.0, ADAPTIVE_MAX))
        return self._last_weight

    # --- per-interval logs (the loop adds them to each metrics.jsonl line) ----------------------
    def _note(self, key, v):
        acc = self._interval[key]
        acc[0] += v
        acc[1] += 1

    def interval_logs(self) -> dict:
        """Means since the previous call: teacher_steps (k per batch) and dsm_weight in use."""
        out = {key: acc[0] / acc[1] for key, acc in self._interval.items() if acc[1]}
        for acc in self._interval.values():
            acc[0], acc[1] = 0.0, 0
        return out
