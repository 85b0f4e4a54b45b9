"""Training: data, networks, methods, the training loop, sampling and evaluation.

Import submodules directly; `training.sampling` stays free of torch for serving.
"""
