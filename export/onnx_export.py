"""The jump x_s = jump(x_t, t, s[, class_label]) of a trained model as one ONNX graph.

The graph holds the network, its preconditioning (with any analytic tables the method
keeps as tensors) and the method's step (Euler, Heun, a consistency function, a CTM
jump), so serving needs nothing but the graph and the shared sampler loop.

Only the Method interface is used (`jump`, `sampler_spec`, `state_tensors`,
`load_state_tensors`), so a method added to the registry exports without changes here.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep import jump, sampling

DEFAULT_OPSET = 18
EXAMPLE_BATCH = 3          # the batch torch.export traces with (dynamic afterwards)
PARITY_BATCHES = (1, 7)    # batch 1 and a larger odd batch
PARITY_RTOL = 1e-4         # jump parity: max abs error <= PARITY_RTOL * max(1, max |torch output|)
SAMPLER_ATOL = 1e-3        # sampler parity on samples in the value range [-1, 1]
SAMPLER_SEEDS = (0, 1, 2)
MAX_PARITY_STEPS = 8


class ParityError(UserError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


class JumpModule(torch.nn.Module):
    """forward(x, t, s) -> x_s: the model's jump with the net and the method's tensors inside."""

    def __init__(self, model):
        super().__init__()
        self.net = model.net
        self.method = model.method  # a plain object, not a Module: holds no parameters
        tensors = dict(model.method.state_tensors() or {})
        bound = {}
        for key in sorted(tensors):
            bname = "method_" + re.sub(r"\W", "_", key)
            self.register_buffer(bname, tensors[key].detach().clone())
            bound[key] = getattr(self, bname)
        if bound:
            # let the method read its tables from this module's buffers, so the exporter
            # sees them as buffers of the graph (they are folded into initializers)
            model.method.load_state_tensors(bound)

    def forward(self, x, t, s):
        return self.method.jump(self.net, x, t, s, None)


class ConditionalJumpModule(JumpModule):
    """forward(x, t, s, class_label) -> x_s for class-conditional models (int64 labels [B])."""

    def forward(self, x, t, s, class_label):
        return self.method.jump(self.net, x, t, s, class_label)


input_names = jump.input_names  # the graph's inputs are the jump contract's (fewstep.jump)


def jump_module(model) -> JumpModule:
    cls = ConditionalJumpModule if model.num_classes > 0 else JumpModule
    return cls(model).eval()


# --- random inputs that look like the sampler's -----------------------------------------------

def _time_at(spec: dict, u: np.ndarray) -> np.ndarray:
    """Times along the model's range: u = 0 -> t_max, u = 1 -> t_end (karras or uniform spacing)."""
    return np.where(u >= 1.0, float(spec["t_end"]), sampling.times_at(spec, u))


def random_inputs(spec: dict, shape, num_classes: int, batch: int, seed: int = 0) -> dict:
    """x_t of data in [-1, 1] noised to a random t; s below t (a third of them at t_end)."""
    rng = np.random.default_rng([seed, batch])
    u_t = rng.uniform(0.0, 0.9, batch)
    u_s = u_t + (1.0 - u_t) * rng.uniform(0.05, 1.0, batch)
    u_s[::3] = 1.0
    t = _time_at(spec, u_t).astype(np.float32)
    s = _time_at(spec, u_s).astype(np.float32)
    x0 = rng.uniform(-1.0, 1.0, (batch,) + tuple(shape))
    z = rng.standard_normal((batch,) + tuple(shape))
    tb = t.astype(np.float64).reshape((-1,) + (1,) * len(shape))
    x = sampling.alpha(spec["process"], tb) * x0 + sampling.sigma(spec["process"], tb) * z
    labels = rng.integers(0, num_classes, batch) if num_classes > 0 else None
    return jump.feeds(x, t, s, labels)


# --- export ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and warnings are noise for a CLI; errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _strip(proto) -> None:
    """Drop per-node debug metadata (stack traces, FX node dumps): smaller, reproducible files."""
    def strip_graph(graph):
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip_graph(attr.g)
                for g in attr.graphs:
                    strip_graph(g)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            del vi.metadata_props[:]
        for init in graph.initializer:
            del init.metadata_props[:]
    strip_graph(proto.graph)
    del proto.graph.metadata_props[:]
    proto.doc_string = ""
    proto.graph.doc_string = ""


def export_onnx(model, path, opset: int = DEFAULT_OPSET) -> dict:
    """Write the jump of `model` (training.build.Model) to `path`; returns facts for the manifest.

    torch.export-based exporter (dynamo=True) with a dynamic batch dimension shared by all
    inputs, the onnxscript optimiser (constant folding, dead code elimination), then
    onnx.checker.
    """
    import onnx

    if opset < 18:
        raise UserError(f"--opset must be 18 or newer, got {opset}")
    module = jump_module(model)
    names = input_names(model.num_classes)
    spec = model.method.sampler_spec()
    ex = random_inputs(spec, model.shape, model.num_classes, EXAMPLE_BATCH, seed=1234)
    args = tuple(torch.from_numpy(ex[n]) for n in names)
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = {n: {0: batch} for n in names}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=names, output_names=[jump.OUTPUT.name],
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True,
                external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many types; one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX export of method {model.method.name!r} failed: {type(e).__name__}: {msg[:300]}") from e
    proto = program.model_proto
    _strip(proto)
    proto.producer_name = "fewstep"
    proto.producer_version = torch.__version__
    onnx.checker.check_model(proto, full_check=True)
    if proto.ByteSize() >= 2 ** 31 - 1:
        raise UserError("the model is larger than 2 GB, the limit of a single-file ONNX model")
    Path(path).write_bytes(proto.SerializeToString(deterministic=True))
    opsets = {o.domain: o.version for o in proto.opset_import}
    return {"opset": int(opsets.get("", opset)), "inputs": names, "output": jump.OUTPUT.name}


# --- parity ----------------------------------------------------------------------------------

def jump_parity(model, onnx_jump, batches=PARITY_BATCHES, rtol: float = PARITY_RTOL) -> dict:
    """Max abs difference of ONNX Runtime vs PyTorch on random inputs at the given batches.

    onnx_jump(x, t, s, labels) -> np.ndarray. Raises ParityError above the tolerance
    rtol * max(1, max |PyTorch output|).
    """
    module = jump_module(model)
    names = input_names(model.num_classes)
    spec = model.method.sampler_spec()
    worst, scale = 0.0, 1.0
    for b in batches:
        feeds = random_inputs(spec, model.shape, model.num_classes, b)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
        got = onnx_jump(*jump.args(feeds))
        if got.shape != ref.shape:
            raise ParityError(f"ONNX output shape {got.shape} != PyTorch {ref.shape} at batch {b}")
        if not np.all(np.isfinite(got)) or not np.all(np.isfinite(ref)):
            raise ParityError(f"non-finite jump outputs at batch {b} (ONNX or PyTorch)")
        worst = max(worst, float(np.max(np.abs(got - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
    tol = rtol * scale
    if not worst <= tol:
        raise ParityError(f"ONNX Runtime and PyTorch jumps differ: max abs error {worst:.3g} > tolerance {tol:.3g}")
    return {"onnx_vs_torch_max_abs": worst, "tolerance": tol, "parity_batches": list(batches)}


def sampler_parity(model, onnx_jump, steps: int | None = None, seeds=SAMPLER_SEEDS,
                   atol: float = SAMPLER_ATOL) -> dict:
    """The shared sampler driven by ONNX Runtime vs by PyTorch: same seeds, same steps.

    Uses the method's default gamma (so stochastic samplers re-noise with the same seeded
    noise on both sides). Raises ParityError above atol (samples live in [-1, 1]).
    """
    spec = model.method.sampler_spec()
    steps = int(steps or min(int(spec["default_steps"]), MAX_PARITY_STEPS))
    seeds = list(seeds)
    n_cls = model.num_classes
    labels = (np.arange(len(seeds)) % n_cls).astype(np.int64) if n_cls else None
    with torch.no_grad():
        ref = model.sample(steps, seeds, labels=torch.from_numpy(labels) if labels is not None else None)
    ref = ref.detach().float().cpu().numpy()
    got = sampling.sample(lambda x, t, s: onnx_jump(x, t, s, labels), spec, steps, seeds, model.shape)
    if not np.all(np.isfinite(got)):
        raise ParityError("the ONNX Runtime sampler produced non-finite samples")
    err = float(np.max(np.abs(got - ref)))
    if not err <= atol or math.isnan(err):
        raise ParityError(f"sampler through ONNX Runtime differs from PyTorch: max abs error {err:.3g} "
                          f"> {atol:.3g} ({steps} steps, seeds {seeds})")
    return {"sampler_max_abs": err, "sampler_steps": steps, "sampler_tolerance": atol,
            "sampler_seeds": seeds}
