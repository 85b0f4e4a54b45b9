"""The one training loop every method shares.

Adam/AdamW with linear warm-up, gradient clipping, EMAs, bf16 autocast on GPU, seeded
randomness, atomic checkpoints and exact resume, JSONL metrics, PNG sample grids, and
DistributedDataParallel under `torchrun` (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fewstep.errors import UserError
from fewstep.training import checkpoint as ck
from fewstep.training.config import DATA_NET_KEYS
from fewstep.training.ema import ema_decay, update_ema
from fewstep.training.build import build_initial_net, build_method, load_teacher_model, resolve_net_config
from fewstep.training.data import Batches, load_dataset
from fewstep.training.sample_png import save_grid


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


def _rng_tensors(device) -> dict:
    out = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _restore_rng(tensors: dict, device) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def _same_run(old: dict, new: dict) -> list[str]:
    """Config fields that must not change on --resume."""
    diffs = []
    for sec in ("method", "net", "data"):
        for k in set(old[sec]) | set(new[sec]):
            if k in ("shape", "num_classes", "data_dir") or k in DATA_NET_KEYS:
                continue
            if old[sec].get(k) != new[sec].get(k):
                diffs.append(f"{sec}.{k}")
    for k in ("batch", "seed"):
        if old["train"].get(k) != new["train"].get(k):
            diffs.append(f"train.{k}")
    return diffs


def train(cfg: dict, out_dir, resume: bool = False, progress: bool = True) -> Path | None:
    """Train per cfg into out_dir; returns the last checkpoint path (rank 0) or None."""
    tcfg = cfg["train"]
    if not isinstance(tcfg["iters"], int) or tcfg["iters"] < 1:
        raise UserError(f"--iters must be a positive integer, got {tcfg['iters']!r}")
    threads_note = set_threads(tcfg.get("threads") or 0)
    rank, world = _dist_env()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(out_dir)

    start = 0
    prev = None
    corrupt = []
    if resume:
        if not ck.list_checkpoints(out):
            raise UserError(f"--resume: no checkpoint in {out}/checkpoints")
        prev, corrupt = ck.newest_intact(out)
        if prev is None:
            raise UserError(f"--resume: no intact checkpoint in {out}/checkpoints ({corrupt[0][1]})")
        old = ck.read_config(prev)
        for sec in ("method", "net"):  # options newer than the run: it goes on with the defaults it was built with
            for k in set(cfg[sec]) - set(old[sec]) - set(DATA_NET_KEYS):
                del cfg[sec][k]
        diffs = _same_run(old, cfg)
        if diffs:
            raise UserError(f"--resume: config differs from the checkpoint's in {', '.join(diffs)}")
        start = int(old["step"])
    elif rank == 0 and ck.list_checkpoints(out):
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or another --out")

    # Data first: a missing dataset fails before anything is written.
    d = cfg["data"]
    ds = load_dataset(d["name"], "train", data_dir=d.get("data_dir"), limit=d.get("limit"),
                      seed=tcfg["seed"], **({"image_size": d["image_size"]} if d.get("image_size") else {}))
    resolve_net_config(cfg, ds.shape, ds.num_classes)
    if tcfg["batch"] % world:
        raise UserError(f"train.batch {tcfg['batch']} is not divisible by the {world} processes")
    batches = Batches(ds, tcfg["batch"] // world, seed=tcfg["seed"], rank=rank, world=world)

    teacher = load_teacher_model(cfg["teacher"], cfg, device) if cfg.get("teacher") else None
    method = build_method(cfg, teacher=teacher)
    if method.needs_teacher and teacher is None:
        raise UserError(f"method {method.name} needs --teacher CKPT")
    net = build_initial_net(cfg, method)  # identical initial weights on every rank
    method.run_samples = tcfg["iters"] * tcfg["batch"]
    method.init_student(net)
    net.to(device).train()
    emas = {str(dcy): copy.deepcopy(net).eval().requires_grad_(False) for dcy in tcfg["ema"]}
    extra = method.train_modules()  # method-owned training modules (e.g. CUD's coupling encoder)
    for m in extra.values():
        m.to(device)
    extra_params = [p for m in extra.values() for p in m.parameters() if p.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad] + extra_params
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}.get(tcfg["optimizer"])
    if opt_cls is None:
        raise UserError(f"train.optimizer must be adam, adamw or radam, got {tcfg['optimizer']!r}")
    opt = opt_cls(params, lr=tcfg["lr"], betas=tuple(tcfg["betas"]), weight_decay=tcfg["weight_decay"])

    if prev is not None:
        net.load_state_dict(ck.load_tensors(prev / ck.MODEL_FILE))
        for name, e in emas.items():
            e.load_state_dict(ck.load_tensors(prev / ck.weights_file(name)))
        tt = ck.load_tensors(prev / "train_state.safetensors")
        meta = ck.read_train_meta(prev)
        ck.optimizer_from_flat(opt, tt, meta["optimizer"])
        for name, m in extra.items():
            pre = f"module.{name}."
            m.load_state_dict({k[len(pre):]: v for k, v in tt.items() if k.startswith(pre)})
        if meta.get("world") == world and f"rng.cpu.{rank}" in tt:
            tt["rng.cpu"] = tt[f"rng.cpu.{rank}"]
        _restore_rng(tt, device)
        if rank == 0:
            for bad, why in corrupt:  # set aside: never loaded again, never rotated in for a good one
                dest = ck.set_aside(bad)
                print(f"[fewstep] --resume: {why}; moved it to {dest} and resumed from {prev.name}",
                      file=sys.stderr)
    else:
        torch.manual_seed(tcfg["seed"] * 1000 + rank)  # per-rank noise from here on

    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ck.write_json(out / "config.json", cfg)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"[fewstep] method={method.name} data={d['name']} {tuple(ds.shape)} n={len(ds)} "
              f"net={cfg['net']['preset']} params={n_params:,} device={device} world={world} "
              f"threads={torch.get_num_threads()}{threads_note}", file=sys.stderr)

    amp = device.type == "cuda" and tcfg["bf16"]
    if rank == 0:  # from a checkpoint, or from scratch after a run killed before its first one
        _drop_metrics_after(out / "metrics.jsonl", start)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=tcfg["iters"], initial=start, disable=not progress or rank != 0, dynamic_ncols=True,
               desc=f"train {method.name}")
    last_ckpt = None
    t_last, n_last = time.time(), start
    t_start, time_limit = t_last, float(tcfg.get("time_limit") or 0)
    for step in range(start, tcfg["iters"]):
        x, y = batches.batch_at(step)
        x = x.to(device, non_blocking=True)
        y = y.to(device) if (y is not None and cfg["net"].get("label_dim")) else None
        for g in opt.param_groups:
            g["lr"] = tcfg["lr"] * min(1.0, (step + 1) / max(1, tcfg["warmup"]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, logs = method.loss(model, x, y, progress=_progress(step, tcfg["iters"], t_start, time_limit))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # DDP averages the net's gradients; the method's own modules by hand
            for p in extra_params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at step {step}: stopping (last checkpoint kept)")
        gnorm = torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"] if tcfg["grad_clip"] > 0 else float("inf"))
        opt.step()
        for dcy, e in emas.items():
            update_ema(e, net, ema_decay(float(dcy), step, tcfg["ema_warmup"]))
        done = step + 1
        bar.update(1)
        if rank == 0 and (done % tcfg["log_every"] == 0 or done == tcfg["iters"]):
            now = time.time()
            ips = (done - n_last) * tcfg["batch"] / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            interval = getattr(method, "interval_logs", None)  # per-interval means a method keeps (CTM)
            rec = {"step": done, **logs, **(interval() if interval else {}), "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"],
                   "images_per_s": round(ips, 2)}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{ips:.0f}")
        if rank == 0 and tcfg["sample_every"] and (done % tcfg["sample_every"] == 0 or done == tcfg["iters"]):
            first = next(iter(emas.values())) if emas else net
            save_grid(method, first, cfg, out / "samples" / f"step-{done:07d}.png", device=device)
        out_of_time = bool(time_limit) and _out_of_time(t_start, time_limit, device, world)
        if done % tcfg["ckpt_every"] == 0 or done == tcfg["iters"] or out_of_time:
            last_ckpt = _save(out, done, cfg, method, net, emas, opt, device, rank, world, tcfg["keep"])
        if out_of_time:
            if rank == 0:
                print(f"[fewstep] train.time_limit {time_limit} min reached at step {done}: stopped "
                      f"(checkpoint saved; --resume continues)", file=sys.stderr)
            break
    bar.close()
    if metrics:
        metrics.close()
    if dist.is_initialized():
        dist.barrier()
    return last_ckpt


def _drop_metrics_after(path: Path, step: int) -> None:
    """Drop the log lines of steps after the starting one, which are trained again (all of
    them on a fresh start). A torn last line (killed mid-write) is dropped too; damage
    elsewhere is an error, not something to guess about."""
    if not path.is_file():
        return
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    keep = []
    if step == 0:  # a fresh start: lines here are from a run stopped before its first checkpoint
        if lines:
            print(f"[fewstep] {path}: dropped {len(lines)} lines of an earlier start that saved no checkpoint",
                  file=sys.stderr)
        lines = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"[fewstep] {path}: dropped a torn last line (the run was killed while writing it)",
                      file=sys.stderr)
                break
            raise UserError(f"{path}: line {i + 1} is not JSON; repair or remove the file to go on") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}: line {i + 1} is not a metrics record; repair or remove the file to go on")
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def set_threads(configured: int) -> str:
    """Set torch's CPU threads: train.threads when given, else OMP_NUM_THREADS when set, else
    auto_threads(). Returns a note on how the count was chosen (for the start-up line)."""
    if configured:
        if not isinstance(configured, int) or configured < 0:
            raise UserError(f"train.threads must be a positive integer or 0 (auto), got {configured!r}")
        torch.set_num_threads(configured)
        return " (train.threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return " (OMP_NUM_THREADS)"
    n, why = auto_threads()
    torch.set_num_threads(n)
    return f" (auto: {why}; set train.threads to change)"


def auto_threads(cpus: int | None = None, load: float | None = None, machine_cpus: int | None = None,
                 procs: int | None = None) -> tuple[int, str]:
    """Threads per process that do not oversubscribe the machine: the CPUs this process may
    use (affinity, cgroup quota), less the busy ones (1-minute load average), shared among
    the local training processes (torchrun's LOCAL_WORLD_SIZE). torch's own default takes
    every CPU, which on a busy machine ran 10x slower than one thread."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpus = min(cpus, _cgroup_cpu_quota() or cpus)
    machine_cpus = machine_cpus or os.cpu_count() or cpus
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    procs = procs or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    idle = machine_cpus - load
    n = max(1, int(min(cpus, idle) + 0.5) // max(1, procs))
    return n, f"{cpus} CPUs, load {load:.1f}, {procs} process{'es' if procs > 1 else ''}"


def _cgroup_cpu_quota() -> int | None:
    """CPUs allowed by a cgroup v2 quota (containers), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def _progress(step: int, iters: int, t_start: float, limit_min: float) -> float:
    """Training progress in [0, 1] for curricula: the iteration fraction, or under
    train.time_limit the elapsed fraction of the budget when that is further along."""
    p = step / iters
    if limit_min:
        p = max(p, (time.time() - t_start) / (60.0 * limit_min))
    return min(p, 1.0)


def _out_of_time(t_start: float, limit_min: float, device, world: int) -> bool:
    """Past the wall-clock budget? Rank 0's clock decides for every rank."""
    over = time.time() - t_start >= 60.0 * limit_min
    if world == 1:
        return over
    flag = torch.tensor([float(over)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def _save(out, step, cfg, method, net, emas, opt, device, rank, world, keep):
    # Every rank's RNG state is gathered so a resumed DDP run continues each rank exactly.
    rng = _rng_tensors(device)
    tensors = dict(rng)
    if world > 1 and dist.get_backend() == "gloo":
        states = [torch.zeros_like(rng["rng.cpu"]) for _ in range(world)]
        dist.all_gather(states, rng["rng.cpu"])
        for r, s in enumerate(states):
            tensors[f"rng.cpu.{r}"] = s
    if rank != 0:
        return None
    otensors, ometa = ck.optimizer_to_flat(opt)
    tensors.update(otensors)
    for name, m in method.train_modules().items():
        tensors.update({f"module.{name}.{k}": v for k, v in m.state_dict().items()})
    return ck.save_checkpoint(out, step, cfg, net.state_dict(), {k: e.state_dict() for k, e in emas.items()},
                              method.state_tensors(), tensors, {"optimizer": ometa, "world": world}, keep)
