"""Training: data, networks, methods, the training loop and evaluation.

Import submodules directly. The sampler loop they share with serving is `fewstep.sampling`
(torch-free, so serving never imports torch).
"""
