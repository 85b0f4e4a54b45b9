"""Damaged training files: checksummed checkpoints (resume falls back, readers refuse),
torn or stale metrics lines, empty train_state.json. Real small runs on 2-D data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.training import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--data", "gmm", "--preset", "toy", "--no-progress", "net.hidden=32", "net.depth=2",
       "train.batch=64", "train.sample_every=0", "train.log_every=1"]
RUN = ["--iters", "6", "train.ckpt_every=2", "train.keep=5"]


def train(out, *extra):
    return main(["train", "--method", "rf", "--out", str(out), *TOY, *extra])


def damage(path: Path, n: int = 4096) -> None:
    """Overwrite n bytes of tensor data in place (0xff bytes: NaN in float32)."""
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")  # past the safetensors header
    assert len(raw) - start >= n
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * n)


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed 6-step run with checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(out, *RUN) == 0
    return out


def test_checkpoints_record_a_hash_per_file(reference):
    last = ck.list_checkpoints(reference)[-1]
    recorded = ck.read_config(last)["sha256"]
    assert sorted(recorded) == sorted(p.name for p in last.iterdir() if p.name != "config.json")
    assert all(ck.sha256_file(last / name) == h for name, h in recorded.items())


def test_resume_falls_back_past_a_damaged_checkpoint_and_loses_nothing(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage(run / "checkpoints/step-0000006/model.safetensors")
    capsys.readouterr()
    assert train(run, *RUN, "--resume") == 0
    err = capsys.readouterr().err
    # names the bad checkpoint and the file, and where it went
    assert "step-0000006" in err and "model.safetensors" in err and "resumed from step-0000004" in err
    aside = run / "checkpoints/corrupt-step-0000006"
    assert aside.is_dir() and (aside / "model.safetensors").is_file()   # kept for inspection
    # steps 5-6 trained again: the same weights and the same log as the undisturbed run
    for f in ("model.safetensors", "ema-0.999.safetensors", "train_state.safetensors"):
        assert same_weights(run / "checkpoints/step-0000006" / f, reference / "checkpoints/step-0000006" / f), f
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-0000002", "step-0000004", "step-0000006"]


def test_empty_train_state_json_falls_back_or_fails_in_one_line(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoints/step-0000006/train_state.json").write_text("")
    assert train(run, *RUN, "--resume") == 0
    assert "train_state.json" in capsys.readouterr().err
    assert same_weights(run / "checkpoints/step-0000006/model.safetensors",
                        reference / "checkpoints/step-0000006/model.safetensors")
    # every checkpoint damaged: one line, exit 2, nothing written
    for c in ck.list_checkpoints(run):
        (c / "train_state.json").write_text("")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train(run, *RUN, "--resume") == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_old_checkpoints_without_hashes_still_resume_and_sample(reference, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ck, "_UNVERIFIED_NOTED", False)  # the note comes once per process
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for c in ck.list_checkpoints(run):  # as saved before the hashes
        cfg = json.loads((c / "config.json").read_text())
        del cfg["sha256"]
        (c / "config.json").write_text(json.dumps(cfg))
    (run / "checkpoints/step-0000006/train_state.json").write_text("")  # and one unreadable
    capsys.readouterr()
    assert train(run, *RUN, "--resume") == 0
    err = capsys.readouterr().err
    assert err.count("records no checksums") == 1 and "resumed from step-0000004" in err
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints/step-0000004", old)
    assert main(["sample", "--ckpt", str(old), "--num", "50", "--out", str(tmp_path / "ok.png")]) == 0
    # without hashes, NaN weights are still refused
    damage(old / "ema-0.999.safetensors")
    assert main(["sample", "--ckpt", str(old), "--num", "50", "--out", str(tmp_path / "nan.png")]) == 2
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "nan.png").exists()


def test_sample_eval_export_refuse_a_damaged_checkpoint(reference, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(reference / "checkpoints/step-0000006", bad)
    damage(bad / "ema-0.999.safetensors")
    capsys.readouterr()
    commands = {
        "sample": ["sample", "--ckpt", str(bad), "--num", "50", "--out", str(tmp_path / "s.png")],
        "eval": ["eval", "--ckpt", str(bad), "--steps", "1", "--num", "50", "--no-progress"],
        "export": ["export", "--ckpt", str(bad), "--out", str(tmp_path / "model")],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "ema-0.999.safetensors" in err and "sha256" in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "model").exists()
    assert not (bad / "eval.json").exists()
    # the online weights are intact: sampling them still works
    assert main(["sample", "--ckpt", str(bad), "--ema", "none", "--num", "50", "--out", str(tmp_path / "s.png")]) == 0


def test_a_torn_last_metrics_line_is_dropped_on_resume(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints/step-0000006")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # killed while writing
    assert train(run, *RUN, "--resume") == 0
    assert "torn last line" in capsys.readouterr().err
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    # damage before the last line is not guessed about: one line, exit 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    shutil.rmtree(run / "checkpoints/step-0000006")
    assert train(run, *RUN, "--resume") == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: line 3 is not JSON" in err and "Traceback" not in err


def test_a_restart_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fewstep", "train", "--method", "rf", "--out", str(run), *TOY,
           "--iters", "1000000", "train.ckpt_every=1000000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log = run / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(steps_logged(run)) >= 3 and not ck.list_checkpoints(run)
    assert train(run, "--iters", "5") == 0  # a fresh start: no checkpoint to resume
    assert steps_logged(run) == [1, 2, 3, 4, 5]
