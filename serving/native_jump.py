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


def warmup_batches(max_batch: int) -> list[int]:
    """Warm-up batch sizes of a native jump: 1, 2, 4, ... and the max batch, so the first
    requests at those sizes do not pay for kernel selection (a GPU runtime picks kernels per
    input shape)."""
    return sorted({1, max_batch} | {b for b in (2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch})


def native_source(src: Path, manifest: dict, jump_backend: str, max_batch: int,
                  target: runtimes.Container | None = None) -> tuple[Path, dict | None]:
    """(the file of the export a native `<name>_jump` serves, its TensorRT engine entry or None).

    target: the Triton container it is written for (export.runtimes.target_container): a
    TensorRT plan built by another TensorRT, or an ONNX IR its onnxruntime cannot read, is
    refused here, before Triton would fail to load it. The config is serving.repository's
    `jump_config`, the same writer as the Python jump's."""
    target = target or runtimes.target_container()
    if jump_backend not in NATIVE:
        raise UserError(f"--jump-backend must be one of {', '.join(JUMP_BACKENDS)}, got {jump_backend!r}")
    if jump_backend != "tensorrt":
        source = model_file(src, manifest["jump"]["file"])
        runtimes.check_onnx(source, target)
        return source, None
    engine = pick_plan(manifest, src)
    runtimes.check_plan(engine, target)
    # the dynamic batcher and the sampler send any batch in [1, max_batch]: the engine's
    # profile must cover all of them
    if int(engine["min_batch"]) > 1 or int(engine["max_batch"]) < max_batch:
        raise UserError(f"{src}: engine {engine['file']} covers batches {engine['min_batch']}-"
                        f"{engine['max_batch']}, the model serves 1-{max_batch}: export with "
                        f"--max-batch {max_batch}")
    return model_file(src, engine["file"]), engine
