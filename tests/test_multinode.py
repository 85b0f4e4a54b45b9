"""Multi-node training: `torchrun --nnodes 2 --rdzv_backend c10d` with both "nodes" on this
machine (one gloo process each), the README's command (docs/deploy.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fewstep.serving.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]


def _image_folder(path: Path, n: int = 16) -> Path:
    """A folder of 28x28 grey images: the `tiny` U-Net's data without any dataset package."""
    from PIL import Image
    rng = np.random.default_rng(0)
    (path / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(path / "a" / f"{i}.png")
    return path


def _two_nodes(out: Path, data: Path, iters: int, *extra: str) -> list[str]:
    """`torchrun --nnodes 2 --node_rank R --rdzv_backend c10d` twice on loopback, one process
    each (gloo): the README's multi-node command with both "nodes" on this machine."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=fewstep-test", "--local_addr=127.0.0.1", str(ROOT / "tests" / "ddp_node.py"),
               "train", "--method", "rf", "--preset", "tiny", "--data", str(data), "--out", str(out),
               "--iters", str(iters), "--no-progress", "train.batch=8", "train.sample_every=0",
               "train.log_every=1", "train.ckpt_every=3", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            errs.append(err)
    finally:  # never leave a node behind
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return errs


@pytest.mark.slow  # two training nodes
def test_two_nodes_train_identical_weights_and_resume_exactly(tmp_path):
    from safetensors.torch import load_file
    data = _image_folder(tmp_path / "images")
    straight, split = tmp_path / "straight", tmp_path / "split"
    errs = _two_nodes(straight, data, 6)
    assert "world=2" in "".join(errs)
    w0, w1 = (load_file(str(straight / f"rank-{r}.safetensors")) for r in (0, 1))
    ckpt = load_file(str(straight / "checkpoints" / "step-0000006" / "model.safetensors"))
    for k in ckpt:
        assert np.array_equal(w0[k].numpy(), w1[k].numpy()), k  # both nodes hold the same net
        assert np.array_equal(w0[k].numpy(), ckpt[k].numpy()), k  # and it is what rank 0 saved
    # stop after 3 steps, resume on two nodes: the same weights as the run that never stopped
    _two_nodes(split, data, 3)
    _two_nodes(split, data, 6, "--resume")
    resumed = load_file(str(split / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert all(np.array_equal(resumed[k].numpy(), ckpt[k].numpy()) for k in ckpt)
    losses = [json.loads(l)["loss"] for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(l)["loss"] for l in (straight / "metrics.jsonl").read_text().splitlines()]
