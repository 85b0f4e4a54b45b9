"""What every training method provides to the shared loop, sampler and exporter."""
from __future__ import annotations

import torch

from fewstep import sampling


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] tensor shaped to broadcast against x [B, ...]."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


def ode_step(velocity, x, t, s, heun: bool = True, v=None):
    """One Euler or Heun step of dx/dt = velocity(x, t) from t to s (per-sample [B] tensors).

    Heun's step to s = 0 is Euler: the second velocity is taken at s = 1 there and not used
    (EDM's velocity divides by the time). v: velocity(x, t), where the caller has it already.
    Flows (rf, cud), EDM and the consistency models' teacher all step with this.
    """
    h = bcast(s - t, x)
    v = velocity(x, t) if v is None else v
    x_euler = x + h * v
    if not heun:
        return x_euler
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    v2 = velocity(x_euler, s_safe)
    return torch.where(bcast(s, x) > 0, x + h * 0.5 * (v + v2), x_euler)


class Method:
    """A method = a loss (`loss`) + how its network moves along a trajectory (`jump`).

    Subclasses set `name`, `defaults` (their options, overridable as method.KEY=VALUE),
    and implement `loss`, `jump` and `sampler_spec`. A method holds no trainable
    parameters: the network is passed in, so the same object serves training, sampling
    and export (training-only helpers, e.g. CUD's coupling encoder, live in `train_modules`).
    """

    name = "base"
    defaults: dict = {}
    needs_teacher = False
    # options that may change after training (how the net is stepped, not the net itself):
    # `fewstep sample --set KEY=VALUE` accepts these
    sample_options: tuple = ()
    # its sampler is meant to take a gamma (CTM's gamma-sampling): the manifest says so, and the
    # page shows the gamma control for it even where the default gamma is 0
    gamma_sampling = False
    # samples the run draws (train.iters x train.batch), set by the training loop before
    # init_student: a method that precomputes data (cud-distill) makes no more than that
    run_samples: int | None = None

    def __init__(self, opts: dict | None = None, teacher=None):
        self.opts = dict(self.defaults)
        unknown = set(opts or {}) - set(self.defaults)
        if unknown:
            raise KeyError(f"unknown option(s) for method {self.name}: {', '.join(sorted(unknown))}"
                           f" (known: {', '.join(sorted(self.defaults)) or 'none'})")
        self.opts.update(opts or {})
        self.teacher = teacher

    # --- network set-up -------------------------------------------------------------------
    def net_overrides(self) -> dict:
        """Network options this method needs (e.g. a second time input, extra heads)."""
        return {}

    def init_student(self, net: torch.nn.Module) -> None:
        """Initialise a fresh network (e.g. from the teacher's weights)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the method needs at sampling time (saved with checkpoints and exports)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def train_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the method owns while training (e.g. CUD's coupling encoder, a student's own
        EMA copy); built in `init_student`. The loop moves them to the device, optimises their
        trainable parameters with the network's, and keeps their state in the training state
        of checkpoints (not in the sampling weights)."""
        return {}

    # --- training ---------------------------------------------------------------------------
    def loss(self, net, x: torch.Tensor, labels: torch.Tensor | None, progress: float = 0.0):
        """Returns (scalar loss, dict of floats to log). `progress` = step / iters in [0, 1]."""
        raise NotImplementedError

    # --- sampling -----------------------------------------------------------------------------
    def jump(self, net, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels=None) -> torch.Tensor:
        """x_t -> x_s for per-sample times t, s [B] (s < t)."""
        raise NotImplementedError

    def sampler_spec(self) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, net, steps: int, seeds, shape, labels=None, gamma=None, device="cpu"):
        """Samples at t_end through the shared sampler loop (torch float32)."""
        proto = torch.zeros(1, device=device)
        return sampling.sample(lambda x, t, s: self.jump(net, x, t, s, labels), self.sampler_spec(),
                               steps, seeds, shape, gamma=gamma, like_x=proto)
