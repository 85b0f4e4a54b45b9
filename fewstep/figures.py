"""Which evaluator made a figure, and whether two figures may be compared. Standard library
only: training, the scripts, the exporter's manifest and the demo page all import it.

Every FID in the project comes from one evaluator (training/evaluator.py): one feature
network, trained once by `fewstep features` with a fixed seed and shipped in the repository
(training/assets/), pinned here by its sha256; one reference, the full test split as served
(uint8). A report records `evaluator_version` and the network's sha256 (`features.sha256`);
figures whose networks differ are never put side by side (`check_comparable`).
"""
from __future__ import annotations

from fewstep.errors import UserError

# Bump when the evaluator computes a figure differently (reference set, quantisation, statistics).
EVALUATOR_VERSION = 2

# The shipped feature networks: dataset name -> (file under training/assets, sha256 of that file).
# Made by `fewstep features --data fmnist --seed 0 --out training/assets/feature-net-fmnist.safetensors`.
SHIPPED_FEATURE_NETS = {
    "fmnist": ("feature-net-fmnist.safetensors",
               "5083c17de8ce8620ab8f848e79b80c28e3c138fe3f78d0d093d427ea08f0a945"),
}


def features_sha(report: dict) -> str | None:
    """The sha256 of the feature network a `fewstep eval` report (or a manifest's `eval`) was
    measured with; None for 2-D reports and Inception FIDs (their own metric) and for reports
    made before the one evaluator (they name no network)."""
    if not isinstance(report, dict):
        return None
    feats = report.get("features")
    if isinstance(feats, dict) and isinstance(feats.get("sha256"), str):
        return feats["sha256"]
    return None


def is_shipped_network(sha: str | None, data_name: str | None = None) -> bool:
    """Whether `sha` is a shipped feature network's (of `data_name` when given)."""
    return any(pin == sha for name, (_, pin) in SHIPPED_FEATURE_NETS.items()
               if data_name is None or name == data_name)


def check_comparable(reports, what: str = "figures") -> None:
    """Raise UserError (one line) unless every FID report names the same feature network and
    evaluator version. 2-D reports (no network) are comparable among themselves."""
    keys = {}
    for r in reports:
        if not isinstance(r, dict):
            continue
        metric = str(r.get("metric") or "")
        if metric == "swd":
            keys.setdefault(("swd", None), r)
            continue
        keys.setdefault((features_sha(r), r.get("evaluator_version")), r)
    if len(keys) > 1:
        desc = ", ".join(f"{(sha or 'unrecorded')[:12]} (evaluator {ver})" for sha, ver in keys)
        raise UserError(f"{what} from different feature networks or evaluators are not compared: {desc}; "
                        "re-score them with `fewstep eval`")
