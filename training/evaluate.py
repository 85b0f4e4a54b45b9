"""`fewstep eval`: sample quality against step count.

Images: FID between Gaussian fits of features of generated samples and of the test split.
The features come from a small CNN classifier the project trains on the train split of
the same dataset (training/feature_classifier.py: trained on first use, cached under
$FEWSTEP_CACHE/classifiers, its test accuracy printed every time; below 90% the metric is
marked untrusted). Inception FID (training/inception.py) is an option where a local
TorchScript Inception feature extractor is given. The metrics are in training/metrics.py.

2-D data: sliced Wasserstein distance (and energy distance) between samples and fresh
data drawn from the generator of the dataset.

Writes a JSON report (default <checkpoint>/eval.json) and one PNG per step count beside it
(`<stem>-steps<k>.png`: a grid of the first 64 images, or a scatter plot), and prints a
small table.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fewstep.errors import UserError
from fewstep.options import check_range, parse_int_list
from fewstep.training.data import load_dataset
from fewstep.training.feature_classifier import TRUST_ACCURACY, get_classifier, log
from fewstep.training.inception import InceptionFeatures
from fewstep.training.metrics import energy_distance, feature_stats, frechet_distance, high_freq_energy, sliced_wasserstein
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
                   help="FID features: the project's classifier (default) or Inception (needs --inception-weights)")
    p.add_argument("--inception-weights", help="local TorchScript Inception-v3 FID feature extractor")
    p.add_argument("--data-dir", help="where the dataset files are (default: the checkpoint's)")
    p.add_argument("--classifier-limit", type=int,
                   help="train the feature classifier on the first N train images only (quick checks; "
                        "cached separately)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling option of the model's method, e.g. solver=heun, sample_head=2 (cud)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Samples -> what a served uint8 image holds, back in [-1, 1]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


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
    check_range("--classifier-limit", args.classifier_limit, 1)
    if args.inception_weights and args.feature != "inception":
        raise UserError("--inception-weights is used only with --feature inception")
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
        "ckpt": str(model.ckpt), "method": model.method.name, "data": data_name,
        "ema": model.ema, "num": num, "seed": args.seed, "gamma": args.gamma,
        "step_in_training": model.config.get("step"), "device": device,
    }
    results = []
    t_sample = 0.0

    if is_2d:
        if args.feature != "classifier":
            raise UserError("--feature inception is for image data; 2-D data is scored with the "
                            "sliced Wasserstein distance")
        ref = load_dataset(data_name, "test", data_dir=data_dir, seed=args.seed + 1).x
        ref2 = load_dataset(data_name, "test", data_dir=data_dir, seed=args.seed + 2).x
        ref, ref2 = ref[:num], ref2[:num]
        floor = {"swd": sliced_wasserstein(ref2, ref, seed=args.seed),
                 "energy": energy_distance(ref2, ref, seed=args.seed)}
        report.update(metric="swd", classifier=None, reference={
            "what": "the metrics between two independent data samples of the same size (the noise floor)",
            "n": int(ref.shape[0]), **floor})
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
            results.append({"steps": k, "swd": sliced_wasserstein(pts, ref, seed=args.seed),
                            "energy": energy_distance(pts, ref, seed=args.seed),
                            "seconds": round(dt, 3), "png": png.name})
    else:
        if args.feature == "inception":
            if not args.inception_weights:
                raise UserError("--feature inception needs --inception-weights FILE: Inception weights are "
                                "not available offline (give a local TorchScript Inception-v3 file)")
            extractor = InceptionFeatures(args.inception_weights, device)
            report.update(metric="fid-inception", classifier=None,
                          inception={"path": str(extractor.path)})
            test = load_dataset(data_name, "test", data_dir=data_dir, image_size=image_size)
            ref_feats = extractor.features(test.x)
        else:
            clf = get_classifier(data_name, data_dir=data_dir, train_limit=args.classifier_limit,
                                 device=device, image_size=image_size, progress=progress)
            test = load_dataset(data_name, "test", data_dir=data_dir, image_size=image_size)
            ref_feats, logits = clf.features(test.x, return_logits=True)
            acc = float((logits.argmax(1) == test.labels).double().mean()) if test.labels is not None else None
            extractor = clf
            report.update(metric="fid-classifier", classifier={
                "test_accuracy": acc if acc is not None else clf.test_accuracy,
                "trusted": bool((acc if acc is not None else clf.test_accuracy) >= TRUST_ACCURACY),
                "path": str(clf.path), "train_n": clf.meta.get("train_n"),
                "train_seconds": clf.meta.get("train_seconds")})
            if not report["classifier"]["trusted"]:
                log(f"warning: the feature classifier's test accuracy is below {TRUST_ACCURACY:.0%}: "
                     "its FID is not to be trusted")
        if tuple(test.shape) != shape:
            raise UserError(f"the model makes {list(shape)} samples but the {data_name} test split holds "
                            f"{list(test.shape)}")
        ref_stats = feature_stats(ref_feats)
        # the noise floor: FID between num train images and the test split
        train_ref = load_dataset(data_name, "train", data_dir=data_dir, limit=num, image_size=image_size)
        report["reference"] = {
            "what": "FID between the first num train images and the test split (the floor)",
            "n": len(train_ref), "fid": frechet_distance(*feature_stats(extractor.features(train_ref.x)),
                                                         *ref_stats)}
        report["test_n"] = int(test.x.shape[0])
        hf_data = high_freq_energy(test.x).mean().item()
        report["reference"]["hf_energy"] = hf_data
        del train_ref
        for k in steps_list:
            feats, grid, hf = [], [], []
            t0 = time.time()

            def consume(x):
                xq = _quantize(x)
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
            results.append({"steps": k, "fid": frechet_distance(*feature_stats(torch.cat(feats)), *ref_stats),
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
    print(f"{report['method']} on {report['data']}, {report['num']} samples, metric {report['metric']}"
          + (f" (classifier test accuracy {report['classifier']['test_accuracy']:.2%})"
             if report.get("classifier") else ""))
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
