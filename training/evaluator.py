"""The project's one evaluator: every FID and every 2-D figure in code, scripts and docs comes
from here (`fewstep eval`, scripts/compare_precond.py, scripts/baselines_2d.py,
scripts/ablation_cud.py through `fewstep eval`).

Images: FID between Gaussian fits of the shipped feature network's features
(training/feature_classifier.py, pinned by sha256 in fewstep/figures.py) of the samples,
quantised to uint8 as they are served, and of the reference: the FULL test split, quantised the
same way. `describe()` is what every report records: the network's sha256, its test accuracy
and the evaluator's version (no paths).

2-D data: sliced Wasserstein distance (and energy distance) to one reference point set, drawn
with REFERENCE_SEED_2D from the dataset's generator (the floor: a second set, seed + 1).
"""
from __future__ import annotations

import torch

from fewstep.errors import UserError
from fewstep.figures import EVALUATOR_VERSION
from fewstep.training.data import load_dataset
from fewstep.training.feature_classifier import TRUST_ACCURACY, get_classifier
from fewstep.training.metrics import energy_distance, feature_stats, frechet_distance, sliced_wasserstein

REFERENCE_SEED_2D = 1


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> what a served uint8 image holds, back in [-1, 1]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class ImageEvaluator:
    """FID of image samples against the full test split, on one feature network."""

    def __init__(self, data_name: str, data_dir=None, image_size=None, features=None, device="cpu",
                 verbose: bool = True):
        self.data_name = data_name
        self.clf = get_classifier(data_name, features=features, device=device, verbose=verbose)
        test = load_dataset(data_name, "test", data_dir=data_dir, image_size=image_size)
        self.test = test
        self.shape = tuple(test.shape)
        feats, logits = self.clf.features(quantize(test.x), return_logits=True)
        self.ref_stats = feature_stats(feats)
        self.test_accuracy = (float((logits.argmax(1) == test.labels).double().mean())
                              if test.labels is not None else self.clf.test_accuracy)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(quantize(x))

    def fid_of_features(self, feats: torch.Tensor) -> float:
        return frechet_distance(*feature_stats(feats), *self.ref_stats)

    def fid(self, x: torch.Tensor) -> float:
        """FID of samples [N, C, H, W] in [-1, 1] (quantised first, as served)."""
        if tuple(x.shape[1:]) != self.shape:
            raise UserError(f"samples of shape {list(x.shape[1:])} against a {self.data_name} test split "
                            f"of {list(self.shape)}")
        return self.fid_of_features(self.features(x))

    def floor(self, n: int, data_dir=None, image_size=None) -> float:
        """FID of the first n train images against the reference: the best a model can do."""
        train = load_dataset(self.data_name, "train", data_dir=data_dir, limit=n, image_size=image_size)
        return self.fid(train.x)

    def describe(self) -> dict:
        """What a report records of this evaluator (no paths)."""
        return {"evaluator_version": EVALUATOR_VERSION, "metric": "fid-classifier",
                "features": {"name": self.clf.path.name, "sha256": self.clf.sha256,
                             "test_accuracy": self.test_accuracy,
                             "trusted": bool(self.test_accuracy >= TRUST_ACCURACY)},
                "reference_n": int(self.test.x.shape[0])}


class PointsEvaluator:
    """Sliced Wasserstein (and energy) distance of 2-D samples to the one reference set."""

    def __init__(self, data_name: str, n: int, data_dir=None):
        self.data_name = data_name
        self.ref = load_dataset(data_name, "test", data_dir=data_dir, seed=REFERENCE_SEED_2D).x[:n]
        self.ref2 = load_dataset(data_name, "test", data_dir=data_dir, seed=REFERENCE_SEED_2D + 1).x[:n]

    def swd(self, pts) -> float:
        return sliced_wasserstein(pts, self.ref, seed=0)

    def energy(self, pts) -> float:
        return energy_distance(pts, self.ref, seed=0)

    def floor(self) -> dict:
        return {"swd": self.swd(self.ref2), "energy": self.energy(self.ref2)}

    def describe(self) -> dict:
        return {"evaluator_version": EVALUATOR_VERSION, "metric": "swd", "features": None,
                "reference_n": int(self.ref.shape[0]), "reference_seed": REFERENCE_SEED_2D}
