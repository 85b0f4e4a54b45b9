"""CUD's final multi-step distillation for 1-step sampling (`--method cud-distill --teacher CKPT`).

The authors' "additional training" (train_distill_update.py, generate.py --save_sub_traj
--save_z in github shaoshitong/Catch-Up-Distillation):

1. Run the trained flow (the teacher, its EMA weights) with 16-step Euler from noise z and
   keep z and the predicted clean sample x0_hat = x_t - t v(x_t, t) at several steps.
2. Initialise the student from the teacher's EMA weights and train its 1-step map
   x = z - v_s(z, 1) towards those targets, plus 0.1 * mse(v_s(z, 1), v_ema(z, 1)) where
   v_ema is the student's own EMA (decay 0.9999).
3. A curriculum of targets: x0_hat from steps 8, 11 and 14 of 16 (t = 8/16, 5/16, 2/16),
   one stage each, in that order (equal thirds of the run here).

The trajectories are generated once per teacher and stored in a compact safetensors file
(float16 z and targets, only the steps the curriculum uses) in a cache keyed by the
teacher's weights and the generation options (or at method.data_file). A run stores no more
than it can draw: min(method.num_trajs, train.iters x train.batch), so a short run does not
wait for 50000 trajectories. Generation writes chunks atomically and picks up where it
stopped when interrupted, with a progress bar on a terminal and log lines elsewhere; the
noise of chunk i depends only on (data_seed, i), so a resumed file equals a fresh one.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fewstep.errors import UserError
from fewstep.files import cache_root, sha256_file
from fewstep.training.checkpoint import weights_file
from fewstep.training.ema import update_ema
from fewstep.training.methods.cud import mse, net_dims
from fewstep.training.methods.rf import RectifiedFlow

FORMAT = 1


def teacher_trajectories(teacher, z, labels, steps: int, keep: list[int]) -> torch.Tensor:
    """Euler with `steps` uniform steps from t = 1; returns x0_hat = x_t - t v(x_t, t) at the
    step indices in `keep` (step i starts at t = 1 - i/steps), stacked [len(keep), B, ...]."""
    x = z
    out = {}
    for i in range(steps):
        t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        v = teacher.method.velocity(teacher.net, x, tt, labels)
        if i in keep:
            out[i] = x - t * v
        if i + 1 > max(keep):
            break
        x = x + (t_next - t) * v
    return torch.stack([out[i] for i in keep])


def _chunk_noise(seed: int, index: int, n: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:15], 16))
    return torch.randn((n,) + tuple(shape), generator=g)


@torch.no_grad()
def generate_trajectories(teacher, path, num: int, steps: int, keep: list[int], seed: int, shape,
                          num_classes: int = 0, batch: int = 500, device="cpu", meta: dict | None = None,
                          progress: bool | None = None) -> Path:
    """Write the distillation data file at `path` (resumable: chunks go to <path>.parts/).
    progress: None = a bar on a terminal, else log lines (about every 10%); True = a bar;
    False = silent."""
    path = Path(path)
    parts = path.with_name(path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = (num + batch - 1) // batch
    bar = tqdm(total=num, desc="cud-distill trajectories", unit="traj", dynamic_ncols=True,
               disable=None if progress is None else not progress)
    log_lines = progress is None and bar.disable
    if progress is not False:
        print(f"[fewstep] cud-distill: generating {num} teacher trajectories ({steps} Euler steps each) "
              f"into {path}", file=sys.stderr)
    t0, computed, next_log = time.time(), 0, 0.1
    for i in range(n_chunks):
        lo, hi = i * batch, min(num, (i + 1) * batch)
        f = parts / f"chunk-{i:06d}.safetensors"
        if f.is_file():
            bar.update(hi - lo)
            continue
        # The student sees z in float16: the teacher starts from exactly that z.
        z = _chunk_noise(seed, i, hi - lo, shape).half()
        labels = torch.arange(lo, hi) % num_classes if num_classes else None
        zd = z.float().to(device)
        targets = teacher_trajectories(teacher, zd, None if labels is None else labels.to(device), steps, keep)
        tensors = {"z": z, "targets": targets.half().cpu()}
        if labels is not None:
            tensors["labels"] = labels
        tmp = parts / f".tmp-chunk-{i:06d}.safetensors"
        save_file(tensors, str(tmp))
        os.replace(tmp, f)
        bar.update(hi - lo)
        computed += hi - lo
        if log_lines and (hi / num >= next_log or hi == num):
            next_log = hi / num + 0.1
            left = (num - hi) * (time.time() - t0) / computed
            print(f"[fewstep] cud-distill trajectories: {hi}/{num}, about {left:.0f} s left", file=sys.stderr)
    bar.close()
    chunks = [load_file(str(parts / f"chunk-{i:06d}.safetensors")) for i in range(n_chunks)]
    merged = {k: torch.cat([c[k] for c in chunks], dim=1 if k == "targets" else 0) for k in chunks[0]}
    tmp = path.with_name(".tmp-" + path.name)
    save_file(merged, str(tmp), metadata={"fewstep": json.dumps(meta or {}, sort_keys=True)})
    os.replace(tmp, path)
    shutil.rmtree(parts, ignore_errors=True)
    return path


def read_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("fewstep", "{}"))


class CUDDistill(RectifiedFlow):
    name = "cud-distill"
    needs_teacher = True
    sample_options = ("solver",)
    defaults = {
        **RectifiedFlow.defaults,
        "time_scale": 1.0,         # must match the teacher's (CUD feeds raw t)
        "prior_shakedrop": True,   # must match the teacher's network
        "default_steps": 1,
        "traj_steps": 16,          # the teacher's Euler steps
        "stage_steps": [8, 11, 14],  # curriculum: x0_hat from these steps (t = 1 - k/traj_steps)
        "num_trajs": 50000,        # stored (z, targets) pairs; fewer when iters x batch is smaller
        "ema_weight": 0.1,         # weight of mse(v, v_ema)
        "ema_decay": 0.9999,       # the student's own EMA for that term
        "data_seed": 0,
        "data_file": "",           # "" = cache keyed by the teacher's weights
        "gen_batch": 500,          # trajectories per chunk while generating
    }

    def __init__(self, opts: dict | None = None, teacher=None):
        super().__init__(opts, teacher)
        o = self.opts
        if not isinstance(o["traj_steps"], int) or o["traj_steps"] < 1:
            raise UserError(f"method.traj_steps must be a positive integer, got {o['traj_steps']!r}")
        st = o["stage_steps"]
        if (not isinstance(st, list) or not st or any(not isinstance(k, int) for k in st)
                or any(not 0 <= k < o["traj_steps"] for k in st)):
            raise UserError(f"method.stage_steps must be a list of step indices in [0, {o['traj_steps'] - 1}], got {st!r}")
        if not isinstance(o["num_trajs"], int) or o["num_trajs"] < 1:
            raise UserError(f"method.num_trajs must be a positive integer, got {o['num_trajs']!r}")
        if not isinstance(o["gen_batch"], int) or o["gen_batch"] < 1:
            raise UserError(f"method.gen_batch must be a positive integer, got {o['gen_batch']!r}")
        if o["prior_shakedrop"] and float(o["time_scale"]) != 1.0:
            raise UserError("method.prior_shakedrop needs method.time_scale=1 (the net reads the raw flow time)")
        self.ema = None
        self.data = None
        if teacher is not None:
            self._check_teacher(teacher)

    def _check_teacher(self, teacher) -> None:
        tm = getattr(teacher, "method", None)
        if getattr(teacher, "net", None) is None or not hasattr(tm, "velocity") \
                or tm.sampler_spec().get("process") != "flow":
            raise UserError("cud-distill needs a flow teacher (a cud or rf checkpoint)")
        for key, default in (("time_scale", 999.0), ("prior_shakedrop", False)):
            theirs = tm.opts.get(key, default)
            if theirs != self.opts[key]:
                raise UserError(f"the student must match the teacher: pass method.{key}={json.dumps(theirs)}")

    def net_overrides(self) -> dict:
        return {"prior_shakedrop": True} if self.opts["prior_shakedrop"] else {}

    # --- set-up: teacher weights, trajectory data, the student's EMA -------------------------
    def init_student(self, net) -> None:
        if self.teacher is None:
            raise UserError("cud-distill needs --teacher CKPT")
        phi_s, phi_t = getattr(net, "shakedrop_phi", None), getattr(self.teacher.net, "shakedrop_phi", None)
        if self.opts["prior_shakedrop"] and phi_s != phi_t:  # same weights, other skip scaling: wrong outputs
            raise UserError(f"the student must match the teacher: pass net.shakedrop_phi={phi_t}")
        state = {k: v for k, v in self.teacher.net.state_dict().items() if not k.startswith("heads.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise UserError("the student's network differs from the teacher's: train with the teacher's "
                            f"--preset and net options ({str(e)[:160]})") from None
        self.data = self.load_data(net_dims(net), int(getattr(net, "label_dim", 0) or 0))
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)

    def train_modules(self) -> dict:
        return {"ema": self.ema} if self.ema is not None else {}

    def data_meta(self, shape, num_classes) -> dict:
        o = self.opts
        t = self.teacher
        return {"format": FORMAT, "teacher_weights": sha256_file(Path(t.ckpt) / weights_file(t.ema)),
                "teacher_method": t.config["method"],
                "num": self.stored_trajectories(), "traj_steps": o["traj_steps"], "stage_steps": o["stage_steps"],
                "seed": o["data_seed"], "shape": list(shape), "num_classes": num_classes}

    def stored_trajectories(self) -> int:
        """method.num_trajs, or fewer when the run draws fewer samples than that."""
        n = self.opts["num_trajs"]
        return min(n, self.run_samples) if self.run_samples else n

    def data_path(self, meta: dict) -> Path:
        if self.opts["data_file"]:
            return Path(self.opts["data_file"])
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        return cache_root() / "cud-distill" / f"{key}.safetensors"

    def load_data(self, shape, num_classes) -> dict:
        import torch.distributed as dist
        meta = self.data_meta(shape, num_classes)
        path = self.data_path(meta)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 and not path.is_file():
            device = next(self.teacher.net.parameters()).device
            generate_trajectories(self.teacher, path, meta["num"], meta["traj_steps"], meta["stage_steps"],
                                  meta["seed"], shape, num_classes, self.opts["gen_batch"], device, meta)
        if dist.is_initialized():
            dist.barrier()
        if read_meta(path) != meta:
            raise UserError(f"{path} holds trajectories of another teacher or other options: "
                            "delete it or set method.data_file to another path")
        return load_file(str(path))

    # --- training ------------------------------------------------------------------------------
    def stage(self, progress: float) -> int:
        n = len(self.opts["stage_steps"])
        return min(int(progress * n), n - 1)

    def distill_loss(self, net, z, target, labels=None):
        """mse(z - v(z, 1), target) + ema_weight * mse(v(z, 1), v_ema(z, 1))."""
        ones = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        v = self.velocity(net, z, ones, labels)
        l_x = mse(z - v, target)
        with torch.no_grad():
            v_ema = self.velocity(self.ema, z, ones, labels)
        l_ema = mse(v, v_ema)
        return l_x + self.opts["ema_weight"] * l_ema, {"loss_x": l_x.item(), "loss_ema": l_ema.item()}

    def loss(self, net, x, labels, progress=0.0):
        if self.data is None:
            raise RuntimeError("cud-distill: call init_student(net) before training")
        # the student's EMA, once per optimizer step (at the start of each loss: the same
        # sequence as updating after each step)
        update_ema(self.ema, net, float(self.opts["ema_decay"]))
        k = self.stage(progress)
        n = self.data["z"].shape[0]
        idx = torch.randint(n, (x.shape[0],))
        z = self.data["z"][idx].to(x.device, torch.float32)
        target = self.data["targets"][k][idx].to(x.device, torch.float32)
        lab = self.data["labels"][idx].to(x.device) if (labels is not None and "labels" in self.data) else None
        loss, logs = self.distill_loss(net, z, target, lab)
        logs.update(loss=loss.item(), stage=k)
        return loss, logs
