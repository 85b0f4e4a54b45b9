"""`fewstep eval`: sample quality against step count, scored by the one evaluator
(training/evaluator.py).

Images: FID on the shipped feature network's features (pinned by sha256; `--features FILE`
for a dataset without a shipped one) against the full test split, samples and reference both
quantised to uint8 as served. Inception FID (training/inception.py) is an option where a local
TorchScript Inception feature extractor is given (its own metric, `fid-inception`).

2-D data: sliced Wasserstein distance (and energy distance) to the one reference set.

Writes a JSON report (default <checkpoint>/eval.json: the evaluator's version and the feature
network's sha256, no absolute paths) and one PNG per step count beside it
(`<stem>-steps<k>.png`: a grid of the first 64 images, or a scatter plot), and prints a
small table.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fewstep.errors import UserError
from fewstep.figures import EVALUATOR_VERSION
from fewstep.options import check_range, parse_int_list
from fewstep.training.data import load_dataset
from fewstep.training.evaluator import ImageEvaluator, PointsEvaluator, quantize
from fewstep.training.feature_classifier import log
from fewstep.training.inception import InceptionFeatures
from fewstep.training.metrics import feature_stats, frechet_distance, high_freq_energy
from fewstep.images import grid_image, save_png
from fewstep.plots import save_scatter, steps_title
from fewstep.sampling import to_uint8
from fewstep.training.build import load_model
from fewstep.training.checkpoint import write_json
from fewstep.training.config import parse_sets
from fewstep.training.sample_png import class_labels

GRID_IMAGES = 64


def add_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint dir or run dir (its latest checkpoint)")
    p.add_argument("--steps", default="1,2,4,8,16", help="comma-separated step counts (default: 1,2,4,8,16)")
    p.add_argument("--num", type=int, help="samples per step count (default: 10000 images, 5000 2-D points)")
    p.add_argument("--seed", type=int, default=0, help="seeds are seed .. seed+num-1 (default 0)")
    p.add_argument("--gamma", type=float, help="stochastic sampling in [0, 1] (consistency models)")
    p.add_argument("--ema", default="default", help="EMA decay to use, or 'none' for the online weights")
    p.add_argument("--batch", type=int, default=500, help="sampling batch size (default 500)")
    p.add_argument("--out", help="output JSON (default: <checkpoint>/eval.json); PNGs go beside it")
    p.add_argument("--feature", default="classifier", choices=("classifier", "inception"),
                   help="FID features: the project's feature network (default) or Inception (needs --inception-weights)")
    p.add_argument("--inception-weights", help="local TorchScript Inception-v3 FID feature extractor")
    p.add_argument("--data-dir", help="where the dataset files are (default: the checkpoint's)")
    p.add_argument("--features", help="a feature network file from `fewstep features` (default: the shipped "
                                     "one of the dataset; figures on another network are not comparable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling option of the model's method, e.g. solver=heun, sample_head=2 (cud)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def portable_path(path) -> str:
    """A path as a report records it: relative to the working directory when inside it, else
    its last two parts (never this machine's absolute layout)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(*p.parts[-2:]).as_posix()


def _sample_all(model, steps, seeds, labels, gamma, device, batch, progress, desc, consume):
    from tqdm import tqdm
    n = len(seeds)
    with tqdm(total=n, disable=not progress, desc=desc, unit="sample", dynamic_ncols=True,
              file=sys.stderr, leave=False) as bar:
        for i in range(0, n, batch):
            lab = labels[i:i + batch] if labels is not None else None
            x = model.sample(steps, seeds[i:i + batch], labels=lab, gamma=gamma, device=device)
            consume(x.detach())
            bar.update(len(seeds[i:i + batch]))


def run(args) -> int:
    steps_list = parse_int_list(args.steps, "--steps")  # in the order given, once each
    check_range("--num", args.num, 2)
    check_range("--seed", args.seed, 0)
    check_range("--batch", args.batch, 1)
    check_range("--gamma", args.gamma, 0, 1)
    if args.inception_weights and args.feature != "inception":
        raise UserError("--inception-weights is used only with --feature inception")
    if args.features and args.feature != "classifier":
        raise UserError("--features names the feature network of the default FID; not with --feature inception")
    progress = not args.no_progress
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = load_model(args.ckpt, ema=None if args.ema == "none" else args.ema, device=device,
                       method_opts=parse_sets(args.set))
    spec = model.method.sampler_spec()
    bad = [k for k in steps_list if not 1 <= k <= int(spec["max_steps"])]
    if bad:
        raise UserError(f"--steps must be in [1, {spec['max_steps']}] for this model, got {bad[0]}")
    dcfg = model.config["data"]
    data_name = dcfg["name"]
    data_dir = args.data_dir or dcfg.get("data_dir")
    image_size = dcfg.get("image_size")
    shape = tuple(model.shape)
    is_2d = len(shape) == 1
    num = args.num or (5000 if is_2d else 10000)
    out = Path(args.out) if args.out else Path(model.ckpt) / "eval.json"
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must name a .json file, got {out}")
    seeds = list(range(args.seed, args.seed + num))
    labels = class_labels(model.num_classes, num, device)

    report = {
        "ckpt": portable_path(model.ckpt), "method": model.method.name,
        "data": portable_path(data_name) if "/" in data_name else data_name,
        "ema": model.ema, "num": num, "seed": args.seed, "gamma": args.gamma,
        "step_in_training": model.config.get("step"), "device": device,
    }
    results = []
    t_sample = 0.0

    if is_2d:
        if args.feature != "classifier":
            raise UserError("--feature inception is for image data; 2-D data is scored with the "
                            "sliced Wasserstein distance")
        if args.features:
            raise UserError("--features is for image data; 2-D data is scored with the sliced Wasserstein distance")
        points = PointsEvaluator(data_name, num, data_dir=data_dir)
        ref = points.ref
        report.update(points.describe())
        report["reference"] = {"what": "the metrics between two independent data samples of the same size "
                                       "(the noise floor)", "n": int(ref.shape[0]), **points.floor()}
        for k in steps_list:
            chunks = []
            t0 = time.time()
            _sample_all(model, k, seeds, labels, args.gamma, device, args.batch, progress,
                        f"sample {k} steps", lambda x: chunks.append(x.float().cpu()))
            dt = time.time() - t0
            t_sample += dt
            pts = torch.cat(chunks)
            png = out.with_name(f"{out.stem}-steps{k}.png")
            save_scatter(pts.numpy(), png, steps_title(model.method.name, k), ref=ref.numpy())
            results.append({"steps": k, "swd": points.swd(pts), "energy": points.energy(pts),
                            "seconds": round(dt, 3), "png": png.name})
    else:
        if args.feature == "inception":
            if not args.inception_weights:
                raise UserError("--feature inception needs --inception-weights FILE: Inception weights are "
                                "not available offline (give a local TorchScript Inception-v3 file)")
            extractor = InceptionFeatures(args.inception_weights, device)
            report.update(metric="fid-inception", evaluator_version=EVALUATOR_VERSION, features=None,
                          inception={"file": Path(extractor.path).name})
            test = load_dataset(data_name, "test", data_dir=data_dir, image_size=image_size)
            ref_stats = feature_stats(extractor.features(quantize(test.x)))

            def fid_of(feats):
                return frechet_distance(*feature_stats(feats), *ref_stats)
        else:
            extractor = ImageEvaluator(data_name, data_dir=data_dir, image_size=image_size,
                                       features=args.features, device=device)
            test = extractor.test
            report.update(extractor.describe())
            fid_of = extractor.fid_of_features
            if not report["features"]["trusted"]:
                log("warning: the feature network's test accuracy is below 90%: its FID is not to be trusted")
        if tuple(test.shape) != shape:
            raise UserError(f"the model makes {list(shape)} samples but the {data_name} test split holds "
                            f"{list(test.shape)}")
        # the floor: FID between num train images and the reference
        train_ref = load_dataset(data_name, "train", data_dir=data_dir, limit=num, image_size=image_size)
        report["reference"] = {
            "what": "FID between the first num train images and the full test split (the floor)",
            "n": len(train_ref), "fid": fid_of(extractor.features(quantize(train_ref.x)))}
        report["test_n"] = int(test.x.shape[0])
        hf_data = high_freq_energy(test.x).mean().item()
        report["reference"]["hf_energy"] = hf_data
        del train_ref
        for k in steps_list:
            feats, grid, hf = [], [], []
            t0 = time.time()

            def consume(x):
                xq = quantize(x)
                if sum(g.shape[0] for g in grid) < GRID_IMAGES:
                    grid.append(xq[:GRID_IMAGES].cpu())
                feats.append(extractor.features(xq))
                hf.append(high_freq_energy(xq).cpu())

            _sample_all(model, k, seeds, labels, args.gamma, device, args.batch, progress,
                        f"sample {k} steps", consume)
            dt = time.time() - t0
            t_sample += dt
            png = out.with_name(f"{out.stem}-steps{k}.png")
            save_png(grid_image(to_uint8(torch.cat(grid)[:GRID_IMAGES])), png)
            results.append({"steps": k, "fid": fid_of(torch.cat(feats)),
                            "hf_ratio": torch.cat(hf).mean().item() / hf_data,
                            "seconds": round(dt, 3), "png": png.name})

    report["results"] = results
    report["sample_seconds"] = round(t_sample, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    _print_table(report)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _print_table(report: dict) -> None:
    cols = ["steps"] + (["swd", "energy"] if report["metric"] == "swd" else ["fid", "hf_ratio"]) + ["seconds"]
    feats = report.get("features")
    print(f"{report['method']} on {report['data']}, {report['num']} samples, metric {report['metric']}"
          + (f" (feature network {feats['sha256'][:12]}, test accuracy {feats['test_accuracy']:.2%})"
             if feats else ""))
    print("  ".join(f"{c:>8}" for c in cols))
    for r in report["results"]:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:>8d}" if isinstance(v, int) else f"{v:>8.4g}")
        print("  ".join(cells))
    ref = report.get("reference") or {}
    floor = ", ".join(f"{k} {ref[k]:.4g}" for k in ("fid", "swd", "energy") if k in ref)
    if floor:
        print(f"data vs data ({ref['n']} samples): {floor}")
