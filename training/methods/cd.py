"""Consistency distillation (Song et al. 2023) from an EDM teacher, and what CTM shares with it.

The student is f_theta(x_t, t) = f(t, eps) x_t + g(t, eps) D_theta(x_t, t), D_theta an
EDM-preconditioned net, (f, g) a preconditioning of training/precond.py (`cm` by default, which
is exactly CM's c_skip/c_out). Loss: pick adjacent times t_n < t_{n+1} of a Karras grid of N
points from eps to T, x_{t_{n+1}} = x + t_{n+1} z, one teacher Heun step to x_hat_{t_n}, and
    d( f_theta(x_{t_{n+1}}, t_{n+1}), f_target(x_hat_{t_n}, t_n) )
with f_target an EMA of the student (decay `target_ema`; 0 by default, i.e. the stop-gradient
online net, as the official CIFAR-10 recipe with N = 18: openai/consistency_models_cifar10
`configs/cifar10_ve_cd.py`; mu = 0.95 belongs to the N = 40 ImageNet/LSUN recipe) and d = L2,
pseudo-Huber or LPIPS (LPIPS only where its weights are on this machine). The student starts as
the teacher; the target runs in the student's mode (same dropout setting), the teacher in eval.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from fewstep.errors import UserError
from fewstep.training import precond as P
from fewstep import sampling
from fewstep.training.ema import update_ema
from fewstep.training.methods.base import Method, bcast, ode_step
from fewstep.training.methods.edm import edm_denoise, pf_ode_velocity


class ConsistencyBase(Method):
    """What CD and CTM share: the teacher, the preconditioned jump, the EMA target, distances."""

    needs_teacher = True
    two_times = False
    # sony/ctm's optimiser (train_util.py: RAdam, lr 4e-4, no warm-up, no gradient clipping),
    # also CD's here; they replace the preset's training settings (train.* overrides still win)
    train_defaults = {"optimizer": "radam", "lr": 4e-4, "warmup": 0, "grad_clip": 0.0}
    common_defaults = {
        "sigma_data": sampling.EDM_SIGMA_DATA,
        "sigma_min": sampling.EDM_T_MIN,  # eps: where every trajectory ends (the boundary condition)
        "sigma_max": sampling.EDM_T_MAX,
        "rho": sampling.EDM_RHO,
        "N": 18,                   # Karras training grid points
        "precond": "cm",           # cm | ctm | analytic (the paper's) | analytic-decay | analytic-full | analytic-none
        "distance": "l2",          # l2 | huber | lpips
        "huber_c": 0.00054,        # pseudo-Huber c = huber_c * sqrt(dim) (iCT)
        "target_ema": 0.999,       # CTM's; CD sets its own
        "precond_variant": None,   # legacy: runs before the names said the form recorded it here
        "precond_points": P.DEFAULT_POINTS,    # used when the analytic tables must be fitted first
        "precond_samples": P.DEFAULT_SAMPLES,
        "max_steps": 64,
        "default_steps": 2,
    }

    def __init__(self, opts=None, teacher=None):
        super().__init__(opts, teacher)
        o = self.opts
        if o["precond"] not in P.PRECONDS:
            raise UserError(f"method.precond must be one of {', '.join(P.PRECONDS)}, got {o['precond']!r}")
        if o["distance"] not in ("l2", "huber", "lpips"):
            raise UserError(f"method.distance must be l2, huber or lpips, got {o['distance']!r}")
        if o["precond_variant"] is not None and not self._legacy_variant_ok():
            raise UserError("method.precond_variant is gone: the form is in the name, --precond "
                            f"{' | '.join(P.ANALYTIC_FORMS)} (analytic = the paper's backward form)")
        if not (isinstance(o["N"], int) and o["N"] >= 2):
            raise UserError(f"method.N must be an integer >= 2, got {o['N']!r}")
        if not 0.0 <= float(o["target_ema"]) < 1.0:
            raise UserError(f"method.target_ema must be in [0, 1), got {o['target_ema']!r}")
        self.precond = None if o["precond"] in P.ANALYTIC_FORMS else P.make_precond(o["precond"], o["sigma_data"])
        self.target = None
        self._lpips = None

    # --- network set-up -------------------------------------------------------------------
    def net_overrides(self):
        if not self.two_times:
            return {}
        return {"two_times": True,
                "s_embedding": "per-block" if self.opts.get("s_embedding", "per-block") == "per-block" else "shared"}

    def init_student(self, net):
        t = self.teacher
        if t is not None and getattr(t, "net", None) is not None:
            tm = t.config["method"]
            if tm.get("name") != "edm":
                raise UserError(f"the teacher must be an edm checkpoint, got method {tm.get('name')!r}")
            if float(tm.get("sigma_data", sampling.EDM_SIGMA_DATA)) != float(self.opts["sigma_data"]):
                raise UserError(f"teacher sigma_data {tm.get('sigma_data')} differs from method.sigma_data "
                                f"{self.opts['sigma_data']}")
            copy_teacher_weights(t.net, net, zero_s=self.opts.get("s_embedding") == "shared-zero")
        if self.opts["precond"] in P.ANALYTIC_FORMS and self.precond is None:
            if t is None:
                raise UserError(f"--precond {self.opts['precond']} needs --teacher")
            tabs = P.teacher_tables(t, points=int(self.opts["precond_points"]),
                                    samples=int(self.opts["precond_samples"]))
            self.precond = P.make_precond(self.opts["precond"], tables=tabs)
        self.target = copy.deepcopy(net).eval().requires_grad_(False)

    def state_tensors(self):
        return self.precond.state_tensors() if self.precond is not None else {}

    def _legacy_variant_ok(self) -> bool:
        """A checkpoint written before the names said the form (precond=analytic with
        precond_variant) still loads: its method.safetensors holds the tables it trained with."""
        return self.opts["precond"] == "analytic" and self.opts["precond_variant"] in P.VARIANTS \
            and self.teacher is None

    def load_state_tensors(self, tensors):
        if self.opts["precond"] in P.ANALYTIC_FORMS:
            pc = P.AnalyticPrecond.from_state(tensors)
            if pc is not None:
                self.precond = pc

    def train_modules(self):
        """The EMA target network: kept in the checkpoints' training state by the loop."""
        return {} if self.target is None else {"target": self.target}

    def update_target(self, net):
        """target <- mu target + (1 - mu) net. Called at the start of every loss(), i.e. after the
        previous optimizer step; a resumed run therefore continues the target exactly."""
        target = self._target(next(getattr(net, "module", net).parameters()).device)
        update_ema(target, net, float(self.opts["target_ema"]))

    def _target(self, device):
        if self.target is None:
            raise RuntimeError("init_student was not called: no target network")
        if next(self.target.parameters()).device != device:
            self.target.to(device)
        return self.target

    # --- the jump -------------------------------------------------------------------------------
    def _precond(self):
        if self.precond is None:
            raise UserError("this model uses the analytic preconditioning but has no tables "
                            "(its checkpoint lacks method.safetensors)")
        return self.precond

    def denoise(self, net, x, t, s=None, labels=None):
        """D_theta(x, t[, s]): the EDM-preconditioned net (s only for two-time nets)."""
        kw = {"s": (s if s is not None else t).log() / 4} if self.two_times else {}
        return edm_denoise(net, x, t, self.opts["sigma_data"], labels, **kw)

    def sampler_spec(self):
        o = self.opts
        return sampling.ve_spec(t_max=o["sigma_max"], t_min=o["sigma_min"], t_end=o["sigma_min"], rho=o["rho"],
                                jump_lands=self.jump_lands,
                                gamma=1.0 if self.jump_lands == "end" else float(o["gamma"]),
                                max_steps=o["max_steps"], default_steps=o["default_steps"])

    # --- teacher --------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_heun(self, x, t, u, labels=None):
        """One Heun step of the teacher's PF-ODE from t to u (per-sample [B], u > 0)."""
        return ode_step(pf_ode_velocity(lambda y, r: self.teacher.denoise(y, r, labels)), x, t, u)

    def grid(self, device):
        """The training grid: N descending Karras times T = t_0 > ... > t_{N-1} = eps (float64)."""
        o = self.opts
        u = torch.arange(int(o["N"]), dtype=torch.float64) / (int(o["N"]) - 1)
        return sampling.karras(u, o["sigma_min"], o["sigma_max"], o["rho"]).to(device)

    # --- distances ------------------------------------------------------------------------------
    def distance(self, a, b):
        """Per-sample distance [B]."""
        o = self.opts
        if o["distance"] == "l2":
            return ((a - b) ** 2).flatten(1).mean(1)
        if o["distance"] == "huber":
            dim = a[0].numel()
            c = float(o["huber_c"]) * math.sqrt(dim)
            return ((a - b).flatten(1).pow(2).sum(1) + c * c).sqrt() - c
        return self._lpips_fn(a.device)(a, b)

    def _lpips_fn(self, device):
        if self._lpips is None:
            self._lpips = load_lpips(device)
        return self._lpips


def load_lpips(device):
    """LPIPS(VGG) if the lpips package and its backbone weights are already on this machine."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise UserError("method.distance=lpips needs the lpips package (pip install lpips) and its VGG "
                        "weights on this machine; use l2 or huber") from None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("vgg16-*.pth")):
        raise UserError(f"method.distance=lpips: no VGG16 weights in {hub} (nothing is downloaded); "
                        "use l2 or huber")
    import lpips
    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)

    def fn(a, b):
        if a.dim() != 4:
            raise UserError("method.distance=lpips works on images only")
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        if a.shape[-1] < 224:
            a = torch.nn.functional.interpolate(a, size=224, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=224, mode="bilinear", align_corners=False)
        return net(a, b).flatten(1).mean(1)
    return fn


def copy_teacher_weights(src: torch.nn.Module, dst: torch.nn.Module, zero_s: bool = False) -> None:
    """Student <- teacher weights. A two-time student's s branch (map_*_s, affine_s) is not in the
    teacher and keeps its random init, as in sony/ctm. zero_s (the 'shared-zero' s embedding):
    its last layer is zeroed instead, so that the s embedding adds silu(0) = 0 and the student
    starts exactly as the teacher."""
    s_sd, d_sd = src.state_dict(), dst.state_dict()
    extra = sorted(k for k in d_sd if k not in s_sd)
    unknown = sorted(k for k in s_sd if k not in d_sd)
    bad = [k for k in s_sd if k in d_sd and s_sd[k].shape != d_sd[k].shape]
    if unknown or bad or any("_s." not in k for k in extra):
        what = (bad or unknown or [k for k in extra if "_s." not in k])[:3]
        raise UserError("the student network does not match the teacher's (pass the teacher's --preset and "
                        f"net options): differing weights {', '.join(what)}")
    dst.load_state_dict(s_sd, strict=False)
    if not zero_s:
        return
    with torch.no_grad():
        for name, mod in dst.named_modules():
            if name.startswith("map_layer1_s"):
                for p in mod.parameters():
                    p.zero_()


def last_layer_weight(net: torch.nn.Module) -> torch.nn.Parameter:
    """The weight of the net's main output layer (U-Net: the last decoder conv; MLP: `out`),
    where CTM balances its DSM term (sony/ctm balances at the same place)."""
    net = getattr(net, "module", net)  # DDP
    out = getattr(net, "out", None)
    if isinstance(out, torch.nn.Module) and getattr(out, "weight", None) is not None:
        return out.weight
    convs = [m for name, m in getattr(net, "dec", {}).items() if name.endswith("aux_conv")]
    if not convs:
        raise UserError(f"no output layer found in {type(net).__name__} for the adaptive DSM weight; "
                        "set method.dsm_weight to a number")
    return convs[-1].weight


class ConsistencyDistillation(ConsistencyBase):
    name = "cd"
    jump_lands = "end"
    defaults = {**ConsistencyBase.common_defaults, "target_ema": 0.0}

    def jump(self, net, x, t, s=None, labels=None):
        """f_theta(x_t, t): always lands at eps (s is ignored)."""
        eps = torch.full_like(t, float(self.opts["sigma_min"]))
        f, g = self._precond().coeffs(t, eps)
        return bcast(f, x) * x + bcast(g, x) * self.denoise(net, x, t, None, labels)

    def loss(self, net, x, labels, progress=0.0):
        self.update_target(net)
        grid = self.grid(x.device).flip(0)   # ascending: eps ... T
        b = x.shape[0]
        n = torch.randint(0, grid.shape[0] - 1, (b,), device=x.device)
        t_lo, t_hi = grid[n].to(x.dtype), grid[n + 1].to(x.dtype)
        x_hi = x + bcast(t_hi, x) * torch.randn_like(x)
        with torch.no_grad():
            x_lo = self.teacher_heun(x_hi, t_hi, t_lo, labels)
            target_net = self._target(x.device)
            target_net.train(net.training)   # the student's dropout setting (references: target.train())
            target = self.jump(target_net, x_lo, t_lo, None, labels)
        pred = self.jump(net, x_hi, t_hi, None, labels)
        loss = self.distance(pred, target).mean()
        return loss, {"loss": loss.item()}
