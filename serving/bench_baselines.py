"""The baselines of `fewstep bench`: the same request served without Triton, in this process.

  * onnxruntime: the in-process sampler on the exported model dir (`--export DIR`), the same
    code the sampler model runs (`serving.protocol.run_group` over `export.runner`), with no
    Triton, gRPC or BLS between the steps;
  * pytorch: the checkpoint (`--ckpt`) sampled eagerly by its training method.

Each is a callable (seeds, steps, labels, gamma) and a dict that describes it.
"""
from __future__ import annotations

from pathlib import Path

from fewstep.errors import UserError
from fewstep import sampling
from fewstep.export.runner import load_runner
from fewstep.serving.protocol import Item, ModelInfo, run_group, to_images


def onnxruntime_baseline(export_dir: str, threads: int | None, meta, device: str = "cpu"):
    """A callable (seeds, steps, labels, gamma) running the sampler in-process on ONNX Runtime."""
    path = Path(export_dir)
    if not path.is_dir():
        raise UserError(f"--export {export_dir}: not a directory")
    runner = load_runner(path, backend="onnxruntime", device="cuda" if device == "gpu" else "cpu",
                         threads=threads or None)
    info = ModelInfo.from_manifest(runner.manifest)
    if tuple(info.shape) != tuple(meta.shape) or info.num_classes != meta.num_classes:
        raise UserError(f"--export {export_dir} is not the served model: it makes {list(info.shape)} samples with "
                        f"{info.num_classes} classes, the server's '{meta.name}' {list(meta.shape)} with "
                        f"{meta.num_classes}")

    def call(seeds, steps, labels, gamma):
        g = sampling.check_request(info.spec, steps, gamma)
        items = [Item(s, steps, g, None if labels is None else labels[i]) for i, s in enumerate(seeds)]
        x = run_group(runner, info, items)
        return to_images(info, x) if info.is_image else x

    return call, {"backend": "onnxruntime", "providers": runner.providers, "threads": threads or "default"}


def pytorch_baseline(ckpt: str, threads: int | None, meta):
    """A callable (seeds, steps, labels, gamma) sampling the checkpoint with PyTorch (eager, CPU)."""
    import torch  # here: the PyTorch baseline row only; serving runs without torch

    from fewstep.training.build import load_model  # torch, as above

    if not Path(ckpt).exists():
        raise UserError(f"--ckpt {ckpt}: no such file or directory")
    model = load_model(ckpt)
    if tuple(model.shape) != tuple(meta.shape):
        raise UserError(f"--ckpt {ckpt} is not the served model: it makes {list(model.shape)} samples, "
                        f"the server's '{meta.name}' {list(meta.shape)}")
    if threads:
        torch.set_num_threads(int(threads))
    value_range = tuple(model.config["data"].get("value_range", (-1.0, 1.0))) \
        if isinstance(model.config.get("data"), dict) else (-1.0, 1.0)

    def call(seeds, steps, labels, gamma):
        lab = None if labels is None else torch.tensor(labels, dtype=torch.long)
        with torch.inference_mode():
            x = model.sample(steps, seeds, labels=lab, gamma=gamma)
        return sampling.to_uint8(x, value_range) if len(meta.shape) == 3 else x.numpy()

    return call, {"backend": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads()}
