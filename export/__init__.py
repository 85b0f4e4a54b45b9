"""Export trained models for serving: ONNX (+ TensorRT) model dirs with a manifest, and a runner.

    fewstep export --ckpt runs/rf-fmnist --out models/fmnist
    from fewstep.export.runner import load_runner, read_manifest

A model dir holds `jump.onnx`, `manifest.json` and optional `jump.<gpu>.trt<ver>.<prec>.plan`
files; see docs/export.md. Importing this package imports nothing heavy.
"""

__all__ = ["load_runner", "read_manifest", "export_model"]


def __getattr__(name):
    if name in ("load_runner", "read_manifest"):
        from fewstep.export import runner
        return getattr(runner, name)
    if name == "export_model":
        from fewstep.export.exporter import export_model
        return export_model
    raise AttributeError(name)
