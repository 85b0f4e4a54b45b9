"""End to end on real Fashion-MNIST: the `tiny` preset trains, samples and evaluates."""
import json
from pathlib import Path

import pytest
from PIL import Image

from fewstep.cli import main
from fewstep.training.data import FMNIST_DIR

pytestmark = pytest.mark.skipif(not Path(FMNIST_DIR).is_dir(),
                                reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.slow  # train, sample and eval on Fashion-MNIST
def test_tiny_fmnist_train_sample_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--method", "rf", "--preset", "tiny", "--iters", "30", "--out", str(run),
                 "--no-progress", "data.limit=512", "train.sample_every=30", "train.log_every=10"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["shape"] == [1, 28, 28]
    assert (run / "samples" / "step-0000030.png").is_file()
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30] and all(m["images_per_s"] > 0 for m in metrics)

    png = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--num", "16", "--seed", "3", "--out", str(png)]) == 0
    img = Image.open(png)
    assert img.size == (4 * 30 + 2, 4 * 30 + 2)  # 4x4 grid of 28-px images with 2-px gaps

    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(run), "--steps", "1", "--num", "200", "--set", "bogus=1"]) == 2
    assert main(["eval", "--ckpt", str(run), "--steps", "1,2", "--num", "200", "--out", str(out),
                 "--no-progress", "--set", "solver=heun"]) == 0
    rep = json.loads(out.read_text())
    assert [r["steps"] for r in rep["results"]] == [1, 2]
    assert all(r["fid"] > 0 for r in rep["results"])
    assert rep["features"]["test_accuracy"] > 0.9   # the shipped feature network
    assert (tmp_path / "eval-steps1.png").is_file() and (tmp_path / "eval-steps2.png").is_file()
