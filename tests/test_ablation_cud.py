"""fewstep.experiments.ablation_cud (scripts/ablation_cud.py): every arm is scored with the
head its authors sample it with."""
import argparse

import pytest

from fewstep.experiments import ablation_cud


@pytest.fixture(scope="module")
def ablation():
    return ablation_cud


def _args(**kw):
    base = dict(steps="1,2", eval_ema="default", eval_num=None, eval_head="authors")
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("arm,head", [("rf", 1), ("rk12", 1), ("rk12-indep", 1), ("rk23", 2), ("rk34", 3),
                                      ("rk12+1step", 1)])
def test_eval_uses_the_authors_head(ablation, arm, head, tmp_path):
    argv, out = ablation.eval_argv(tmp_path / arm, arm, _args())
    sets = [argv[k + 1] for k, a in enumerate(argv) if a == "--set"]
    assert sets == ([f"sample_head={head}"] if head > 1 else [])
    assert out.name == ("eval.json" if head == 1 else f"eval-head{head}.json")
    assert argv[argv.index("--out") + 1] == str(out)


def test_eval_head_main_scores_head_1(ablation, tmp_path):
    argv, out = ablation.eval_argv(tmp_path / "rk34", "rk34", _args(eval_head="main", eval_ema="0.999"))
    assert "--set" not in argv and out.name == "eval-ema-0.999.json"
