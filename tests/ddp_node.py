"""One torchrun worker of tests/test_multinode.py's multi-node test: `fewstep train` as usual,
then this rank's trained weights go to <out>/rank-<RANK>.safetensors, so the test can compare
the nodes (only rank 0 writes checkpoints)."""
import os
import sys

from safetensors.torch import save_file

import fewstep.training.loop as loop
from fewstep.cli import main

nets = []
_build = loop.build_initial_net


def _capture(*args, **kwargs):  # the net this rank trains (DDP wraps it, sharing its tensors)
    net = _build(*args, **kwargs)
    nets.append(net)
    return net


loop.build_initial_net = _capture
rc = main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
save_file({k: v.detach().contiguous() for k, v in nets[0].state_dict().items()},
          os.path.join(out, f"rank-{os.environ['RANK']}.safetensors"))
sys.exit(rc)
