"""Write a Triton model repository from exported model dirs.

For a model dir whose manifest names it `NAME` (or `NAME=DIR` on the command line):

    NAME_jump/     config.pbtxt, 1/model.py (serving/models/jump.py), 1/model/ (the export)
    NAME_sampler/  config.pbtxt, 1/model.py (serving/models/sampler.py), 1/manifest.json
    NAME_stream/   config.pbtxt, 1/model.py (serving/models/stream.py), 1/manifest.json
    NAME/          config.pbtxt (an ensemble over NAME_sampler), 1/

The config.pbtxt files are plain Triton model configuration (text protobuf); the jump
is a Python-backend model here because the bundled server has only that backend (in
NVIDIA's Triton container a `onnxruntime_onnx` or `tensorrt_plan` config could take its
place, with the same inputs and outputs).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from fewstep import jump
from fewstep.export import runtimes
from fewstep.export.manifest import MANIFEST, model_file, read_manifest, recommended_steps, step_quality
from fewstep.errors import UserError
from fewstep.serving import native_jump
from fewstep.serving.protocol import INPUTS, ModelInfo, ModelMeta, input_ranges, range_text
from fewstep.export.runner import cuda_provider_problem, tensorrt_engine_here
from fewstep.serving import launcher

MODELS_DIR = Path(__file__).with_name("models")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
SUFFIXES = ("_jump", "_sampler", "_stream")


@dataclass
class Options:
    instances: int = 0            # instances of the model that runs the jump (0 = auto: `serving_plan`)
    sampler_instances: int = 0    # sampler instances, one scheduler each (0 = as `instances`)
    workers: int = 8              # worker threads per stream instance
    device: str = "auto"          # auto | cpu | gpu: where the jump runs
    backend: str = "auto"         # export.runner backend: auto | onnxruntime | tensorrt
    threads: int = 0              # intra-op threads per jump session (0 = auto: `serving_plan`)
    png: bool = True              # offer the optional `png` output
    jump: str = "auto"            # the sampler's jump: "inline" (in its process), "bls" (<name>_jump), auto
    jump_backend: str = "python"  # Triton backend of <name>_jump: python | onnxruntime | tensorrt (serving/native_jump.py)
    triton_container: str = ""    # the container a native jump is written for (export.runtimes.target_container)


@dataclass(frozen=True)
class ServingPlan:
    """What `serving_plan` settled: the jump mode and how many of what run it."""
    jump: str                     # inline | bls
    instances: int                # sampler instances (one scheduler each)
    jump_instances: int           # <name>_jump instances
    threads: int                  # intra-op threads per jump session
    sampler_kind: str             # KIND_CPU, or KIND_GPU when the sampler runs the jump on a GPU


def serving_plan(opts: Options, kind: str, cores: int | None = None) -> ServingPlan:
    """Defaults by device, from measurement (docs/PERFORMANCE.md, "Serving defaults"):

    - the jump runs inline (in the sampler's process) on the CPU and on a GPU: a BLS hop
      cost 3.4 ms of wall time per step on the CPU host against 0.08 ms inline, and on a
      GPU that hop would outweigh a ~1 ms jump (the GPU side is unmeasured: scripts/gpu_check.sh);
    - on the CPU, instances x threads = cores with one thread per session (up to 8
      instances, then more threads each): two 1-thread sessions cost 16-17 ms of CPU per
      fmnist image against 20.6 for one 2-thread session; on a GPU, one instance per GPU.
    """
    cores = cores or os.cpu_count() or 1
    mode = "inline" if opts.jump == "auto" else opts.jump
    gpu = kind == "KIND_GPU"
    if gpu:
        instances = opts.instances or 1
        threads = opts.threads or 1
    else:
        instances = opts.instances or (max(1, cores // opts.threads) if opts.threads else min(cores, 8))
        threads = opts.threads or max(1, cores // instances)
    sampler_instances = opts.sampler_instances or instances
    return ServingPlan(jump=mode, instances=sampler_instances,
                       jump_instances=instances if mode == "bls" else 1, threads=threads,
                       sampler_kind=kind if (mode == "inline" and gpu) else "KIND_CPU")


def parse_model_arg(text: str) -> tuple[str | None, Path]:
    """`DIR` or `NAME=DIR`."""
    name, sep, path = text.partition("=")
    if sep and name and not os.path.exists(text):
        return name, Path(path)
    return None, Path(text)


# --- config.pbtxt text -------------------------------------------------------------------------

def _q(s: str) -> str:
    return json.dumps(str(s))


def _tensor(name: str, dtype: str, dims, optional: bool = False, comment: str = "", reshape=None) -> str:
    lines = ["  {"]
    if comment:
        lines.append(f"    # {comment}")
    lines += [f"    name: {_q(name)}", f"    data_type: {dtype}", f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
    if reshape is not None:
        lines.append(f"    reshape: {{ shape: [ {', '.join(str(d) for d in reshape)} ] }}")
    if optional:
        lines.append("    optional: true")
    lines.append("  }")
    return "\n".join(lines)


def _block(key: str, entries: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(entries) + "\n]"


def _params(params: dict) -> str:
    return "\n".join(f"parameters {{ key: {_q(k)} value {{ string_value: {_q(v)} }} }}"
                     for k, v in params.items())


def _instance(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {int(count)} kind: {kind} }} ]"


def request_inputs(info: ModelInfo) -> list[str]:
    """The inputs clients send to `<name>` and `<name>_stream` (serving.protocol.INPUTS, one
    value per image), each with its range for this model."""
    ranges = input_ranges(info)
    out = []
    for name, inp in INPUTS.items():
        where = f"in {range_text(*ranges[name])}" if name in ranges else "refused: this model is unconditional"
        out.append(_tensor(name, inp.config_type, [1], optional=inp.optional, comment=f"{inp.what}; {where}"))
    return out


def result_outputs(info: ModelInfo, png: bool, stream: bool = False) -> dict:
    """{output name: its config text} of `<name>`, `<name>_sampler` and `<name>_stream`."""
    outs = {}
    if info.is_image:
        outs["image"] = _tensor("image", "TYPE_UINT8", list(info.image_shape), comment="uint8 image, [H, W, C]")
        if png and not stream:
            outs["png"] = _tensor("png", "TYPE_STRING", [1], comment="the image as PNG bytes")
    outs["sample"] = _tensor("sample", "TYPE_FP32", list(info.shape),
                             comment=f"the float sample in {list(info.value_range)}, before quantisation")
    if stream:
        outs["step"] = _tensor("step", "TYPE_INT32", [1], comment="steps done so far (the last response: all)")
    return outs


def _jump_tensor(tensor: jump.JumpTensor, info: ModelInfo, native: bool) -> str:
    """One tensor of the jump contract (fewstep.jump) in `<name>_jump`'s config: [B, 1] for a
    per-sample value, which a native backend's graph takes as [B] (`reshape`)."""
    what = tensor.what
    if tensor is jump.CLASS_LABEL:
        what += f"; in [0, {info.num_classes - 1}]"
    return _tensor(tensor.name, tensor.config_type, tensor.dims(info.shape), comment=what,
                   reshape=[] if native and tensor.per_sample else None)


def jump_config(info: ModelInfo, opts: Options, kind: str, plan: ServingPlan, engine: dict | None = None) -> str:
    """`<name>_jump`'s config on the Python backend (serving/models/jump.py over export.runner)
    or on a native one (opts.jump_backend: Triton runs the export's file itself): one writer,
    so the two declare the same inputs and outputs and the sampler's BLS calls fit either."""
    native = opts.jump_backend != "python"
    if native:
        platform, backend, filename = native_jump.NATIVE[opts.jump_backend]
        head = [f"# {info.name}_jump: x_s = jump(x_t, t, s) on Triton's {backend} backend ({filename})"]
        if engine is not None:
            head.append(f"# TensorRT engine {engine['file']}: built for {engine['gpu']} with TensorRT "
                        f"{engine['tensorrt']} ({engine['precision']}); it loads only on that GPU and TensorRT")
        head += [f"name: {_q(info.name + '_jump')}", f"platform: {_q(platform)}", f"backend: {_q(backend)}"]
        threads = opts.jump_backend == "onnxruntime" and kind == "KIND_CPU" and plan.threads
        params = {"intra_op_thread_count": str(plan.threads)} if threads else {}
        warmup = jump_warmup(info, native_jump.warmup_batches(info.max_batch))
    else:
        head = [f"# {info.name}_jump: x_s = jump(x_t, t, s) of the exported model (export.runner)",
                f"name: {_q(info.name + '_jump')}", 'backend: "python"']
        params = {"model_dir": "model", "backend": opts.backend, "threads": str(plan.threads)}
        warmup = jump_warmup(info)
    return "\n".join(head + [
        f"max_batch_size: {info.max_batch}",
        "# a queue delay would be paid on every sampler step: none",
        "dynamic_batching { max_queue_delay_microseconds: 0 }",
        _block("input", [_jump_tensor(i, info, native) for i in jump.inputs(info.num_classes)]),
        _block("output", [_jump_tensor(jump.OUTPUT, info, native)]),
        _instance(plan.jump_instances, kind),
        _params(params),
        warmup,
        "",
    ])


def _warmup(comment: str, inputs: list, batch_sizes=(1,), samples=None) -> str:
    """A `model_warmup` block: one sample per batch size (Triton sends that many batch-1
    requests at once); inputs are (name, TYPE, dims, file or None for zeros); a file is raw
    data in the model's warmup/ dir (`write_warmup_files`). samples: [(name, inputs)] instead,
    batch size 1 each, sent one after the other."""
    if samples is None:
        samples = [("first_request" if tuple(batch_sizes) == (1,) else f"batch_{b}", b, inputs) for b in batch_sizes]
    else:
        samples = [(name, 1, ins) for name, ins in samples]
    lines = [f"# {comment}", "model_warmup ["]
    for i, (name, b, inputs) in enumerate(samples):
        lines += ["  {" if i == 0 else "  }, {", f'    name: "{name}"', f"    batch_size: {b}"]
        for inp, dtype, dims, file in inputs:
            data = f'input_data_file: "{file}"' if file else "zero_data: true"
            lines.append(f'    inputs {{ key: "{inp}" value {{ data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] '
                         f"{data} }} }}")
    return "\n".join(lines + ["  }", "]"])


def jump_warmup(info: ModelInfo, batch_sizes=(1,)) -> str:
    """Triton runs a 1-step jump (zeros at t_max, to t_end) at each batch size before it
    marks the jump ready."""
    files = {jump.T.name: "t_max", jump.S.name: "t_end"}  # zeros for x and the label
    inputs = [(i.name, i.config_type, i.dims(info.shape), files.get(i.name)) for i in jump.inputs(info.num_classes)]
    return _warmup("jumps before the model is ready, so the first request finds it warm", inputs, batch_sizes)


def sampler_warmup(info: ModelInfo) -> str:
    """Triton sends two requests (seed 0) through execute() before it marks the sampler ready
    (inline only: with bls the jump model may not be loaded yet): 1 step, which execute()
    runs and answers itself, and 2 steps, through the scheduler's thread and the response
    sender."""
    def inputs(steps_file):
        return [(name, INPUTS[name].config_type, [1], steps_file if name == "steps" else None)
                for name in ("seed", "steps", "class_label") if name != "class_label" or info.num_classes]
    return _warmup("a request down each path of the sampler before it is ready", [],
                   samples=[("one_step", inputs("steps_1")), ("first_request", inputs("steps"))])


def write_warmup_files(repo: Path, info: ModelInfo, plan: ServingPlan) -> None:
    import numpy as np

    files = {info.name + "_jump": {k: np.array([info.spec[k]], np.float32) for k in ("t_max", "t_end")}}
    if plan.jump == "inline":
        files[info.name + "_sampler"] = {"steps": np.array([min(2, info.max_steps)], INPUTS["steps"].numpy),
                                         "steps_1": np.array([1], INPUTS["steps"].numpy)}
    for model, arrays in files.items():
        d = repo / model / "warmup"
        d.mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            (d / name).write_bytes(arr.tobytes())


def sampler_config(info: ModelInfo, opts: Options, plan: ServingPlan) -> str:
    where = f"BLS to {info.name}_jump" if plan.jump == "bls" else "the jump in its own process"
    return "\n".join([
        f"# {info.name}_sampler: the N-step sampler; one scheduler per instance advances every sample "
        f"in flight with one jump call per step ({where})",
        f"name: {_q(info.name + '_sampler')}",
        'backend: "python"',
        f"max_batch_size: {info.max_batch}",
        "# execute() only queues requests for the scheduler; they join its batch at the next step",
        "dynamic_batching { max_queue_delay_microseconds: 0 }",
        _block("input", request_inputs(info)),
        _block("output", list(result_outputs(info, opts.png).values())),
        _instance(plan.instances, plan.sampler_kind),
        _params(_loop_params(info, opts, plan)),
        sampler_warmup(info) if plan.jump == "inline" else "",
        "",
    ])


def stream_config(info: ModelInfo, opts: Options, plan: ServingPlan) -> str:
    return "\n".join([
        f"# {info.name}_stream: one request = one image; a preview response after every step (gRPC streaming)",
        f"name: {_q(info.name + '_stream')}",
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        _block("input", request_inputs(info)),
        _block("output", list(result_outputs(info, opts.png, stream=True).values())),
        _instance(1, plan.sampler_kind),
        _params(_loop_params(info, opts, plan)),
        "",
    ])


def _loop_params(info: ModelInfo, opts: Options, plan: ServingPlan) -> dict:
    """Parameters of the models that run the sampler loop (sampler, stream)."""
    p = {"jump_model": info.name + "_jump", "jump_max_batch": str(info.max_batch),
         "model_name": info.name, "manifest": "manifest.json", "workers": str(opts.workers),
         "jump_mode": plan.jump}
    if plan.jump == "inline":
        # the export dir inside <name>_jump, relative to the repository root
        p.update(jump_dir=f"{info.name}_jump/1/model", threads=str(plan.threads), backend=opts.backend)
    return p


def ensemble_config(info: ModelInfo, opts: Options, manifest: dict) -> str:
    outputs = result_outputs(info, opts.png)
    step = ["    {", f"      model_name: {_q(info.name + '_sampler')}", "      model_version: -1"]
    step += [f"      input_map {{ key: {_q(n)} value: {_q(n)} }}" for n in INPUTS]
    step += [f"      output_map {{ key: {_q(n)} value: {_q(n)} }}" for n in outputs]
    step.append("    }")
    # what the model was made for and how good it is at each step count (for the page)
    meta = ModelMeta.from_info(info, outputs, method=manifest.get("method", ""),
                               recommended_steps=recommended_steps(manifest), quality=step_quality(manifest),
                               gamma_sampling=manifest.get("gamma_sampling", False))
    return "\n".join([
        f"# {info.name}: what clients call. seed[/steps/class_label/gamma] -> image (+ png, sample)",
        f"# {len(INPUTS)} inputs of one value per image; up to {info.max_batch} images per request",
        f"name: {_q(info.name)}",
        'platform: "ensemble"',
        f"max_batch_size: {info.max_batch}",
        _block("input", request_inputs(info)),
        _block("output", list(outputs.values())),
        "ensemble_scheduling {\n  step [\n" + "\n".join(step) + "\n  ]\n}",
        "# the model's settings, for clients (GetModelConfig; serving.protocol.ModelMeta)",
        _params(meta.to_params()),
        "",
    ])


# --- writing -------------------------------------------------------------------------------------

def _copy_file(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_model_dir(src: Path, dst: Path, manifest: dict) -> None:
    """Copy exactly manifest.json and the files it names (each a plain file directly in
    src, checked by export.manifest.model_file): nothing else of src reaches the repository."""
    dst.mkdir(parents=True)
    for f in sorted(set(manifest["files"]) | {MANIFEST}):
        path = model_file(src, f)
        if not path.is_file():
            raise UserError(f"--model {src}: {f} is listed in the manifest but missing")
        _copy_file(path, dst / f)


def _write_python_model(model_root: Path, source: str, config: str, manifest: dict | None = None) -> None:
    version = model_root / "1"
    version.mkdir(parents=True)
    shutil.copy2(MODELS_DIR / source, version / "model.py")
    (model_root / "config.pbtxt").write_text(config)
    if manifest is not None:
        (version / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def instance_kind(device: str, manifest: dict) -> tuple[str, str | None]:
    """(KIND_GPU or KIND_CPU for the jump, why not the GPU or None). `--device gpu` where the
    jump cannot run on a GPU is refused in one line: never a silent fall-back to the CPU."""
    if device == "cpu":
        return "KIND_CPU", None
    if device not in ("auto", "gpu"):
        raise UserError(f"unknown device {device!r} (auto, cpu, gpu)")
    why = gpu_unavailable(manifest)
    if why is None:
        return "KIND_GPU", None
    if device == "gpu":
        raise UserError(f"--device gpu: {why}")
    return "KIND_CPU", why


def gpu_unavailable(manifest: dict) -> str | None:
    """Why the jump cannot run on a GPU here (no GPU; no CUDA build of ONNX Runtime and no
    TensorRT for the model's plans), or None when it can."""
    if not launcher.gpu_present():
        return "no NVIDIA GPU is visible on this host"
    if manifest.get("engines") and importlib.util.find_spec("tensorrt") is not None:
        return None
    try:
        return cuda_provider_problem()
    except ImportError as e:
        return f"onnxruntime cannot be imported ({e})"


def jump_runtime(kind: str, opts: Options, manifest: dict, why_not_gpu: str | None) -> str:
    """What runs the jump, for the start-up line: the runtime and its provider (and, on the
    CPU beside a GPU, why the GPU is not used)."""
    if opts.jump_backend != "python":
        return f"Triton's {opts.jump_backend} backend ({kind}, in NVIDIA's container)"
    if kind == "KIND_GPU":
        if opts.backend != "onnxruntime" and manifest.get("engines"):
            engine, _ = tensorrt_engine_here(manifest)
            if engine is not None:
                return f"TensorRT ({engine['file']}) on the GPU"
        return "ONNX Runtime's CUDAExecutionProvider on the GPU"
    text = "ONNX Runtime's CPUExecutionProvider"
    if why_not_gpu and opts.device == "auto" and not why_not_gpu.startswith("no NVIDIA GPU"):
        text += f" (a GPU is present, but {why_not_gpu})"
    return text


def write_repository(repo, model_args: list[str], opts: Options | None = None) -> list[dict]:
    """Write (or refresh) the models of each exported dir into `repo`.

    Returns one dict per model: name, the model names written, the source dir, the kind.
    Other entries of `repo` are left alone; the four models of a name are replaced.
    """
    opts = opts or Options()
    if opts.instances < 0 or opts.sampler_instances < 0 or opts.threads < 0:
        raise UserError("--instances, --sampler-instances and --threads must be >= 0 (0 = auto)")
    if opts.jump not in ("auto", "bls", "inline"):
        raise UserError(f"--jump must be auto, bls or inline, got {opts.jump!r}")
    if opts.jump_backend not in native_jump.JUMP_BACKENDS:
        raise UserError(f"--jump-backend must be one of {', '.join(native_jump.JUMP_BACKENDS)}, "
                        f"got {opts.jump_backend!r}")
    target = runtimes.target_container(opts.triton_container) if opts.jump_backend != "python" else None
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Path] = {}
    written = []
    for arg in model_args:
        name, src = parse_model_arg(arg)
        if not src.is_dir():
            raise UserError(f"--model {src}: not a directory")
        manifest = read_manifest(src)
        name = name or manifest.get("name") or src.resolve().name
        if not NAME_RE.match(name) or name.endswith(SUFFIXES):
            raise UserError(f"model name {name!r}: use letters, digits and _ (and no suffix {', '.join(SUFFIXES)})")
        if name in seen:
            raise UserError(f"two models are named {name!r} ({seen[name]} and {src}); rename one with NAME=DIR")
        seen[name] = src
        info = ModelInfo.from_manifest(manifest, name=name)
        native = opts.jump_backend != "python"
        if native:  # a jump on Triton's own backend is reached by BLS only
            if opts.jump == "inline":
                raise UserError(f"--jump-backend {opts.jump_backend} serves <name>_jump on Triton's own backend, "
                                f"which the sampler calls by BLS: use --jump bls (or auto)")
            kind, why_not_gpu = native_jump.native_kind(opts.device, opts.jump_backend), None
            plan = serving_plan(replace(opts, jump="bls"), kind)
        else:
            kind, why_not_gpu = instance_kind(opts.device, manifest)
            plan = serving_plan(opts, kind)
        names = [name + "_jump", name + "_sampler", name + "_stream", name]
        for n in names:
            shutil.rmtree(repo / n, ignore_errors=True)
        if native:
            source, engine = native_jump.native_source(src, manifest, opts.jump_backend, info.max_batch, target)
            (repo / names[0] / "1").mkdir(parents=True)
            _copy_file(source, repo / names[0] / "1" / native_jump.NATIVE[opts.jump_backend][2])
            (repo / names[0] / "config.pbtxt").write_text(jump_config(info, opts, kind, plan, engine))
        else:
            _write_python_model(repo / names[0], "jump.py", jump_config(info, opts, kind, plan))
            _copy_model_dir(src, repo / names[0] / "1" / "model", manifest)
        _write_python_model(repo / names[1], "sampler.py", sampler_config(info, opts, plan), manifest)
        _write_python_model(repo / names[2], "stream.py", stream_config(info, opts, plan), manifest)
        write_warmup_files(repo, info, plan)
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(ensemble_config(info, opts, manifest))
        written.append({"name": name, "models": names, "source": str(src), "kind": kind, "info": info,
                        "plan": plan, "runtime": jump_runtime(kind, opts, manifest, why_not_gpu)})
    return written
