"""Build methods and networks from a config; load trained models for sampling."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.errors import UserError
from fewstep.training import checkpoint as ck
from fewstep.training.data_2d import default_gmm
from fewstep.training.methods import method_class
from fewstep.training.methods.edm import EDM
from fewstep.training.networks import build_net as _build


def resolve_net_config(cfg: dict, shape: tuple, num_classes: int) -> None:
    """Fill the data-dependent network options into cfg['net'] (in place)."""
    net = cfg["net"]
    labels = num_classes if cfg["data"].get("conditional") else 0
    is_image = len(shape) == 3
    if (net["arch"] == "mlp") == is_image:  # an MLP takes points, a U-Net takes images
        what = f"images of shape {list(shape)}" if is_image else f"{shape[0]}-D points"
        fits = "an image preset (tiny, fmnist-cpu, fmnist, cifar10)" if is_image else "--preset toy"
        raise UserError(f"net preset {net.get('preset')!r} ({net['arch']}) does not fit {cfg['data']['name']} "
                        f"({what}): use {fits}")
    if net["arch"] == "mlp":
        net.update(dim=int(shape[0]), label_dim=labels)
    else:
        net.update(img_resolution=int(shape[-1]), in_channels=int(shape[0]),
                   out_channels=int(shape[0]), label_dim=labels)
    cfg["data"]["shape"] = list(shape)
    cfg["data"]["num_classes"] = int(num_classes)


def build_method(cfg: dict, teacher=None):
    opts = {k: v for k, v in cfg["method"].items() if k != "name"}
    try:
        return method_class(cfg["method"]["name"])(opts, teacher=teacher)
    except KeyError as e:
        raise UserError(str(e.args[0])) from None


def build_net(cfg: dict, method) -> torch.nn.Module:
    kwargs = {k: v for k, v in cfg["net"].items() if k != "preset"}
    kwargs.update(method.net_overrides())
    try:
        return _build(kwargs)
    except TypeError as e:
        raise UserError(f"bad network options: {e}") from None


def build_initial_net(cfg: dict, method) -> torch.nn.Module:
    """The network at step 0: seeded with train.seed (identical on every rank, and rebuilt
    the same way by scripts/debias_ema.py to take these weights out of an EMA)."""
    torch.manual_seed(int(cfg["train"]["seed"]))
    return build_net(cfg, method)


@dataclass
class Model:
    """A trained model ready to sample: config, method, network (in eval mode)."""
    config: dict
    method: object
    net: torch.nn.Module | None
    ckpt: Path | None = None
    ema: str | None = None

    @property
    def shape(self) -> tuple:
        return tuple(self.config["data"]["shape"])

    @property
    def num_classes(self) -> int:
        return int(self.config["data"].get("num_classes", 0)) if self.config["data"].get("conditional") else 0

    def denoise(self, x, sigma, labels=None):
        return self.method.denoise(self.net, x, sigma, labels)

    def jump(self, x, t, s, labels=None):
        return self.method.jump(self.net, x, t, s, labels)

    def sample(self, steps, seeds, labels=None, gamma=None, device="cpu"):
        return self.method.sample(self.net, steps, seeds, self.shape, labels=labels, gamma=gamma, device=device)


def load_model(path, ema: str | None = "default", device="cpu", load_teacher: bool = False,
               method_opts: dict | None = None) -> Model:
    """Load a checkpoint (or a run dir's latest) for sampling.

    ema: "default" = the config's first EMA decay, None = the online weights, or a decay
    such as "0.999". method_opts: sampling options of the method to change (only those in
    its `sample_options`, e.g. a CUD model's solver and sample_head).
    """
    ckpt = ck.find_checkpoint(path)
    cfg = ck.read_config(ckpt)
    if method_opts:
        allowed = tuple(getattr(method_class(cfg["method"]["name"]), "sample_options", ()))
        bad = sorted(set(method_opts) - set(allowed))
        if bad:
            raise UserError(f"{', '.join(bad)}: not a sampling option of method {cfg['method']['name']} "
                            f"(its sampling options: {', '.join(allowed) or 'none'})")
        cfg["method"].update(method_opts)
    teacher = None
    if load_teacher and cfg.get("teacher"):
        teacher = load_teacher_model(cfg["teacher"], cfg, device)
    method = build_method(cfg, teacher=teacher)
    net = build_net(cfg, method)
    names = ck.ema_names(ckpt)
    if ema == "default":
        ema = str(cfg["train"]["ema"][0]) if cfg["train"].get("ema") else None
        ema = ema if ema in names else None
    if ema is not None and ema not in names:
        raise UserError(f"checkpoint {ckpt} has no EMA {ema!r} (has: {', '.join(names) or 'none'})")
    fname = ck.weights_file(ema)
    has_method = (ckpt / ck.METHOD_FILE).is_file()
    ck.verify(ckpt, [fname] + ([ck.METHOD_FILE] if has_method else []), cfg)
    state = ck.load_tensors(ckpt / fname)
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:  # e.g. a diverged run, or damage to a checkpoint without checksums
        raise UserError(f"checkpoint {ckpt}: {fname} holds NaN or inf in {len(nonfinite)} tensors "
                        f"(first: {nonfinite[0]})")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt}: weights do not fit the network of its config ({str(e)[:200]})") from None
    if has_method:
        method.load_state_tensors(ck.load_tensors(ckpt / ck.METHOD_FILE))
    net.to(device).eval().requires_grad_(False)
    return Model(cfg, method, net, ckpt, ema)


class ExactGMMTeacher:
    """The closed-form EDM denoiser of the 2-D gmm data: a perfect teacher without training."""

    def __init__(self, cfg: dict):
        self.gmm = default_gmm()
        self.method = EDM()
        self.net = None
        self.config = {"method": {"name": "edm", **EDM.defaults}, "data": {"name": "gmm", "shape": [2]}}

    def denoise(self, x, sigma, labels=None):
        return self.gmm.denoiser(x, sigma).to(x.dtype)

    def jump(self, x, t, s, labels=None):
        return self.method.ode_step(self.denoise, x, t, s)


def load_teacher_model(spec: str, cfg: dict, device="cpu"):
    if spec == "exact":
        if cfg["data"]["name"] != "gmm":
            raise UserError("--teacher exact exists only for the 2-D gmm data")
        return ExactGMMTeacher(cfg)
    return load_model(spec, device=device)
