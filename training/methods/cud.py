"""Catch-Up Distillation (Shao et al. 2023, arXiv 2305.10769): a flow trained to catch up
with its own previous-moment output.

The net is a plain velocity net v(x_t, t) on the rectified-flow path x_t = t z + (1 - t) x
(the conventions of `RectifiedFlow`, which this class extends). Its loss pulls v(x_t, t)
both towards the ground-truth velocity z - x and towards the velocity the *same online
net* (under stop-gradient, dropout on) predicts a moment earlier on the trajectory,
x_{t-dt} = x_t - dt * slope. With `pred_step` = 2 or 3 the slope is a Runge-Kutta
combination of 2 or 3 velocity evaluations and extra output heads learn the velocity 2
and 3 moments earlier (the authors' "RK23" / "RK34" alignment).

Facts are from the authors' code (github shaoshitong/Catch-Up-Distillation: flows.py
`CatchUpFlow`, train_cud_reverse_img_ddp.py, network_edm.py); docs/methods/cud.md says
which option follows which fact and where we differ.

Sampling: Euler or Heun (`solver`) on the uniform flow grid with the main head or a chosen
extra head (`sample_head`); 1 step is x = z - v(z, 1). Both are options of the method, so
`jump` stays a pure torch function of (x, t, s, labels) that export traces to ONNX.
"""
from __future__ import annotations

import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.training.methods.base import bcast
from fewstep.training.methods.rf import RectifiedFlow

DT_SCHEDULES = ("origin", "rule", "uniform")
COUPLINGS = ("independent", "encoder")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (torch.nn.MSELoss, as the authors use)."""
    return ((a - b) ** 2).mean()


class CouplingEncoder(nn.Module):
    """The learned noise coupling: z = mu(x) + exp(logvar(x) / 2) * e, e ~ N(0, I).

    The authors pair each training image with a noise drawn from a learned Gaussian
    encoder q(z|x) held near N(0, I) by a KL term (sampling still starts from N(0, I)).
    Their encoder is a second SongUNet of the same size; ours is a small conv net (images)
    or MLP (2-D) - see docs/methods/cud.md. The last layer starts at exactly zero, so
    training starts from the independent coupling (mu = 0, logvar = 0), as the authors'
    near-zero-initialised output conv does.
    """

    def __init__(self, shape, width: int | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) == 1:
            d = self.shape[0]
            w = width or 128
            self.body = nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU())
            self.out = nn.Linear(w, 2 * d)
        elif len(self.shape) == 3:
            c = self.shape[0]
            w = width or 32
            self.body = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(w, w, 3, padding=1), nn.SiLU())
            self.out = nn.Conv2d(w, 2 * c, 3, padding=1)
        else:
            raise ValueError(f"CouplingEncoder: unsupported data shape {self.shape}")
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        mu, logvar = self.out(self.body(x)).chunk(2, dim=1)
        return mu + (0.5 * logvar).exp() * noise, mu, logvar


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) per data dimension, averaged over the batch
    (the authors' `get_kl`: the per-sample sum divided by the number of dimensions)."""
    return (0.5 * (-1.0 - logvar + mu ** 2 + logvar.exp())).mean()


def net_dims(net) -> tuple:
    """The per-sample data shape a fewstep net was built for (SongUNet or MLP)."""
    net = getattr(net, "module", net)  # DDP
    if hasattr(net, "img_resolution"):
        return (int(net.in_channels), int(net.img_resolution), int(net.img_resolution))
    return (int(net.dim),)


class CUD(RectifiedFlow):
    name = "cud"
    sample_options = ("solver", "sample_head")
    defaults = {
        **RectifiedFlow.defaults,
        # The authors feed the raw flow time t in [0, 1] to the net (prior ShakeDrop reads it).
        "time_scale": 1.0,
        "pred_step": 1,            # 1 = RK12 (catch-up to one previous moment), 2 = RK23, 3 = RK34
        "dt_schedule": "uniform",  # origin: dt = 1/TN; rule: dt = t/TN; uniform: dt ~ U(0, 1/TN)
        "tn": 16,                  # TN, the number of "moments" on [0, 1]
        "w_catchup": 1.0,          # weight of mse(v, previous-moment output)
        "w_gt": 1.0,               # weight of mse(v, z - x)
        "adaptive_weight": False,  # weights 2*p*w_catchup and 2*(1-p)*w_gt, p = training progress
        "coupling": "encoder",     # encoder (learned q(z|x) + KL) | independent (z ~ N(0, I))
        "kl_weight": 20.0,         # weight of the coupling encoder's KL term (authors: --weight_prior 20)
        "encoder_width": 0,        # hidden width of the coupling encoder; 0 = 32 (images) / 128 (2-D)
        "prior_shakedrop": True,   # scale decoder skip concatenations by the flow time (U-Nets only)
        "sample_head": 1,          # sample with head k (1 = main velocity, 2..pred_step = extra heads)
    }

    def __init__(self, opts: dict | None = None, teacher=None):
        super().__init__(opts, teacher)
        self.encoder: CouplingEncoder | None = None
        self._check_opts()

    def _check_opts(self) -> None:
        o = self.opts
        if o["pred_step"] not in (1, 2, 3) or isinstance(o["pred_step"], bool):
            raise UserError(f"method.pred_step must be 1, 2 or 3, got {o['pred_step']!r}")
        if o["dt_schedule"] not in DT_SCHEDULES:
            raise UserError(f"method.dt_schedule must be one of {', '.join(DT_SCHEDULES)}, got {o['dt_schedule']!r}")
        if not isinstance(o["tn"], int) or isinstance(o["tn"], bool) or o["tn"] < 1:
            raise UserError(f"method.tn must be a positive integer, got {o['tn']!r}")
        if o["coupling"] not in COUPLINGS:
            raise UserError(f"method.coupling must be one of {', '.join(COUPLINGS)}, got {o['coupling']!r}")
        if o["solver"] not in ("euler", "heun"):
            raise UserError(f"method.solver must be euler or heun, got {o['solver']!r}")
        if not isinstance(o["sample_head"], int) or not 1 <= o["sample_head"] <= o["pred_step"]:
            raise UserError(f"method.sample_head must be in [1, pred_step={o['pred_step']}], got {o['sample_head']!r}")
        if o["prior_shakedrop"] and float(o["time_scale"]) != 1.0:
            raise UserError("method.prior_shakedrop needs method.time_scale=1 (the net reads the raw flow time); "
                            "pass method.prior_shakedrop=false to scale the time input")

    # --- network -----------------------------------------------------------------------------
    def net_overrides(self) -> dict:
        out = {"extra_heads": self.opts["pred_step"] - 1}
        if self.opts["prior_shakedrop"]:
            out["prior_shakedrop"] = True
        return out

    def init_student(self, net) -> None:
        """Builds the coupling encoder (its size follows the data the net was built for)."""
        if self.opts["coupling"] == "encoder":
            self.encoder = CouplingEncoder(net_dims(net), self.opts["encoder_width"] or None).train()

    def train_modules(self) -> dict:
        return {"encoder": self.encoder} if self.encoder is not None else {}

    # --- the velocity and its heads ------------------------------------------------------------
    def velocity(self, net, x, t, labels=None, head: int | None = None):
        """Head `head` (default: method.sample_head) of the net at (x, t): 1 = the main velocity."""
        head = self.opts["sample_head"] if head is None else head
        ts = t * self.opts["time_scale"]
        if head == 1:
            return net(x, ts, class_labels=labels)
        return net(x, ts, class_labels=labels, heads=True)[head - 1]

    def all_heads(self, net, x, t, labels=None) -> list:
        """[v, g_1, ..., g_{pred_step-1}] from one forward pass."""
        ts = t * self.opts["time_scale"]
        if self.opts["pred_step"] == 1:
            return [net(x, ts, class_labels=labels)]
        out = net(x, ts, class_labels=labels, heads=True)
        return list(out[:self.opts["pred_step"]])

    # --- the pieces of the loss ------------------------------------------------------------------
    def draw_dt(self, t: torch.Tensor) -> torch.Tensor:
        """The catch-up step dt [B] for flow times t [B], per method.dt_schedule."""
        tn = float(self.opts["tn"])
        sched = self.opts["dt_schedule"]
        if sched == "uniform":
            return torch.rand_like(t) / tn
        if sched == "rule":
            return t / tn
        return torch.full_like(t, 1.0 / tn)

    def couple(self, x: torch.Tensor):
        """(z, kl): the noise paired with x, and the coupling's KL term (0 when independent)."""
        e = torch.randn_like(x)
        if self.opts["coupling"] == "encoder":
            if self.encoder is None:
                raise RuntimeError("coupling=encoder: call init_student(net) before training")
            z, mu, logvar = self.encoder(x, e)
            return z, gaussian_kl(mu, logvar)
        return e, x.new_zeros(())

    def rk_slope(self, v, xt, t, dt):
        """The Runge-Kutta slope of the authors' code for pred_step 1/2/3, with v(x, t) a velocity.

        1: k1.  2: (k1 + k2)/2, k2 = v(x - h k1, t - h).
        3: 5/12 k1 + 2/3 k2 - 1/12 k3, k3 = v(x - h (7/4 k1 + 1/4 k2), t - 2h).
        """
        k = self.opts["pred_step"]
        h = bcast(dt, xt)
        k1 = v(xt, t)
        if k == 1:
            return k1
        k2 = v(xt - h * k1, t - dt)
        if k == 2:
            return 0.5 * (k1 + k2)
        k3 = v(xt - h * (1.75 * k1 + 0.25 * k2), t - 2 * dt)
        return (5.0 / 12.0) * k1 + (2.0 / 3.0) * k2 - (1.0 / 12.0) * k3

    @torch.no_grad()
    def catchup_targets(self, net, xt, t, dt, labels=None) -> list:
        """T_m = v(x_t - m dt slope, t - m dt), m = 1..pred_step: the previous-moment outputs of
        the online net (no gradient; the net's current mode, i.e. dropout on in training).
        Times are clamped to [eps, 1] as in the authors' code."""
        eps = self.opts["eps"]

        def v(y, u):
            return self.velocity(net, y, u.clamp(eps, 1.0), labels, head=1)

        slope = self.rk_slope(v, xt, t, dt)
        h = bcast(dt, xt)
        return [v(xt - m * h * slope, t - m * dt) for m in range(1, self.opts["pred_step"] + 1)]

    def end_mask(self, t, dt) -> torch.Tensor:
        """True where the catch-up target is used; near the end (t < eps + pred_step*dt) the
        target is the ground truth z - x instead."""
        return t >= self.opts["eps"] + self.opts["pred_step"] * dt

    def weights(self, progress: float) -> tuple[float, float]:
        o = self.opts
        if o["adaptive_weight"]:
            return 2.0 * progress * o["w_catchup"], 2.0 * (1.0 - progress) * o["w_gt"]
        return float(o["w_catchup"]), float(o["w_gt"])

    def catchup_loss(self, net, x, z, t, dt, labels=None, progress: float = 0.0):
        """The loss for given data x, noise z, times t and steps dt (all drawn by `loss`)."""
        tb = bcast(t, x)
        xt = tb * z + (1 - tb) * x
        gt = z - x
        preds = self.all_heads(net, xt, t, labels)
        targets = self.catchup_targets(net, xt.detach(), t, dt, labels)
        keep = self.end_mask(t, dt).reshape((-1,) + (1,) * (x.dim() - 1))
        gt_sg = gt.detach()
        targets = [torch.where(keep, tm, gt_sg) for tm in targets]
        l_cu = sum(mse(p, tm) for p, tm in zip(preds, targets))
        l_gt = sum(mse(p, gt) for p in preds)
        w1, w2 = self.weights(progress)
        return w1 * l_cu + w2 * l_gt, {"loss_catchup": l_cu.item(), "loss_gt": l_gt.item(),
                                       "end_frac": 1.0 - keep.float().mean().item()}

    def loss(self, net, x, labels, progress=0.0):
        eps = self.opts["eps"]
        z, kl = self.couple(x)
        t = torch.rand(x.shape[0], device=x.device) * (1 - eps) + eps
        dt = self.draw_dt(t)
        loss, logs = self.catchup_loss(net, x, z, t, dt, labels, progress)
        if self.opts["coupling"] == "encoder":
            loss = loss + self.opts["kl_weight"] * kl
            logs["kl"] = kl.item()
        logs["loss"] = loss.item()
        return loss, logs
