"""Export trained models for serving: ONNX (+ TensorRT) model dirs with a manifest, and a runner.

    fewstep export --ckpt runs/rf-fmnist --out models/fmnist
    from fewstep.export.runner import load_runner, read_manifest
    from fewstep.export.exporter import export_model   # torch: the training layer loads the checkpoint

A model dir holds `jump.onnx`, `manifest.json` and optional `jump.<gpu>.trt<ver>.<prec>.plan`
files; see docs/export.md. Importing this package imports nothing heavy.
"""
