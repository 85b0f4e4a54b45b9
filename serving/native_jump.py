"""`<name>_jump` on one of Triton's native backends, for NVIDIA's Triton container.

`fewstep serve --jump-backend onnxruntime|tensorrt` writes the jump as

    NAME_jump/  config.pbtxt             platform onnxruntime_onnx (or tensorrt_plan)
                1/model.onnx             the export's jump.onnx (or 1/model.plan: its TensorRT engine)
                warmup/t_max, t_end      the warm-up data (serving.repository.write_warmup_files)

with the same inputs and outputs as the Python-backend jump, so the sampler's BLS calls
and every client are unchanged. The ONNX graph takes t, s (and class_label) as [B]
tensors; the config declares them [B, 1] like the Python jump and `reshape`s them to [B].
Triton runs the `model_warmup` samples (batch 1 up to the max batch) on every instance
before the model is ready, so a ready server is a warm one.

The bundled server (nvidia-pytriton) has only the Python backend: a repository written this
way runs in NVIDIA's container (deploy/Dockerfile), not under `fewstep serve` here.
"""
from __future__ import annotations

from pathlib import Path

from fewstep.export import runtimes
from fewstep.export.manifest import model_file
from fewstep.export.runner import RUNTIMES
from fewstep.errors import UserError
from fewstep.serving.protocol import ModelInfo

# --jump-backend value -> (Triton platform, Triton backend, file in the version dir)
NATIVE = {
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan"),
}
assert tuple(NATIVE) == RUNTIMES, "a native backend per jump runtime"
JUMP_BACKENDS = ("python",) + RUNTIMES


def native_kind(device: str, jump_backend: str) -> str:
    """Instance kind of a native jump. The repository is written for the serving machine
    (usually the container), so this host's GPU is not consulted: Triton itself refuses a
    KIND_GPU instance where no GPU is visible."""
    if device not in ("auto", "cpu", "gpu"):
        raise UserError(f"unknown device {device!r} (auto, cpu, gpu)")
    if device == "cpu":
        if jump_backend == "tensorrt":
            raise UserError("--jump-backend tensorrt runs on a GPU only; drop --device cpu")
        return "KIND_CPU"
    return "KIND_GPU"


def pick_plan(manifest: dict, src: Path) -> dict:
    """The export's TensorRT engine entry for `--jump-backend tensorrt` (exactly one)."""
    engines = manifest.get("engines") or []
    if not engines:
        raise UserError(f"--jump-backend tensorrt: {src} has no TensorRT engine; export with "
                        f"--format onnx,tensorrt on a GPU like the serving one")
    if len(engines) > 1:
        have = ", ".join(e["file"] for e in engines)
        raise UserError(f"--jump-backend tensorrt: {src} has {len(engines)} engines ({have}); Triton "
                        f"serves one plan per model: export one per target GPU into its own dir")
    return engines[0]


def _tensor(name: str, dtype: str, dims, per_sample_scalar: bool = False) -> str:
    body = f'name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]'
    if per_sample_scalar:  # [B, 1] on the wire, [B] in the graph
        body += " reshape: { shape: [ ] }"
    return "  { " + body + " }"


def warmup_batches(max_batch: int) -> list[int]:
    """Warm-up batch sizes of a native jump: 1, 2, 4, ... and the max batch, so the first
    requests at those sizes do not pay for kernel selection (a GPU runtime picks kernels per
    input shape)."""
    return sorted({1, max_batch} | {b for b in (2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch})


def native_jump_config(info: ModelInfo, jump_backend: str, kind: str, instances: int, max_batch: int,
                       threads: int = 0, engine: dict | None = None) -> str:
    platform, backend, filename = NATIVE[jump_backend]
    inputs = [_tensor("x", "TYPE_FP32", info.shape),
              _tensor("t", "TYPE_FP32", [1], per_sample_scalar=True),
              _tensor("s", "TYPE_FP32", [1], per_sample_scalar=True)]
    if info.num_classes:
        inputs.append(_tensor("class_label", "TYPE_INT64", [1], per_sample_scalar=True))
    lines = [
        f"# {info.name}_jump: x_s = jump(x_t, t, s) on Triton's {backend} backend ({filename})",
    ]
    if engine is not None:
        lines.append(f"# TensorRT engine {engine['file']}: built for {engine['gpu']} with TensorRT "
                     f"{engine['tensorrt']} ({engine['precision']}); it loads only on that GPU and TensorRT")
    lines += [
        f'name: "{info.name}_jump"',
        f'platform: "{platform}"',
        f'backend: "{backend}"',
        f"max_batch_size: {max_batch}",
        "# a queue delay would be paid on every sampler step: none",
        "dynamic_batching { max_queue_delay_microseconds: 0 }",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + _tensor("x_s", "TYPE_FP32", info.shape) + "\n]",
        f"instance_group [ {{ count: {int(instances)} kind: {kind} }} ]",
    ]
    if jump_backend == "onnxruntime" and kind == "KIND_CPU" and threads:
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{int(threads)}" }} }}')
    from fewstep.serving.repository import jump_warmup  # the Python jump's warm-up, at more batch sizes

    lines += [jump_warmup(info, warmup_batches(max_batch)), ""]
    return "\n".join(lines)


def write_native_jump(model_root: Path, src: Path, info: ModelInfo, manifest: dict, jump_backend: str,
                      kind: str, instances: int, threads: int, copy_file,
                      target: runtimes.Container | None = None) -> dict:
    """Write `<name>_jump` for a native backend into model_root; returns what it wrote.

    target: the Triton container it is written for (export.runtimes.target_container): a
    TensorRT plan built by another TensorRT, or an ONNX IR its onnxruntime cannot read, is
    refused here, before Triton would fail to load it."""
    target = target or runtimes.target_container()
    if jump_backend not in NATIVE:
        raise UserError(f"--jump-backend must be one of {', '.join(JUMP_BACKENDS)}, got {jump_backend!r}")
    engine = None
    max_batch = info.max_batch
    if jump_backend == "tensorrt":
        engine = pick_plan(manifest, src)
        source = model_file(src, engine["file"])
        runtimes.check_plan(engine, target)
        # the dynamic batcher and the sampler send any batch in [1, max_batch]: the engine's
        # profile must cover all of them
        if int(engine["min_batch"]) > 1 or int(engine["max_batch"]) < max_batch:
            raise UserError(f"{src}: engine {engine['file']} covers batches {engine['min_batch']}-"
                            f"{engine['max_batch']}, the model serves 1-{max_batch}: export with "
                            f"--max-batch {max_batch}")
    else:
        source = model_file(src, manifest["jump"]["file"])
        runtimes.check_onnx(source, target)
    filename = NATIVE[jump_backend][2]
    version = model_root / "1"
    version.mkdir(parents=True)
    copy_file(source, version / filename)
    (model_root / "config.pbtxt").write_text(
        native_jump_config(info, jump_backend, kind, instances, max_batch, threads, engine))
    return {"file": str(version / filename), "max_batch": max_batch, "engine": engine}
