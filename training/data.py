"""Datasets for training and evaluation: images (Fashion-MNIST, MNIST, CIFAR-10, any folder
of images) and the 2-D track (``gmm`` with its exact denoiser, ``moons``, ``checkerboard``).

Everything is loaded fully into memory as float32 tensors: images ``[N, C, H, W]`` in
``[-1, 1]``, 2-D points ``[N, 2]``. Plain PyTorch + numpy + PIL; nothing is ever unpickled.

``Batches`` gives deterministic, resumable minibatches: batch ``k`` is a pure function of
``(seed, k, rank, world)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep.training.data_2d import NAMES as TWO_D_NAMES
from fewstep.training.data_2d import GMM, default_gmm, exact_denoiser, sample_points  # noqa: F401  (part of this API)

__all__ = [
    "Dataset",
    "DataError",
    "load_dataset",
    "known_names",
    "GMM",
    "default_gmm",
    "exact_denoiser",
    "Batches",
    "FMNIST_DIR",
]

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_NAMES = ("fmnist", "mnist", "cifar10")
_ALIASES = {
    "fashion-mnist": "fmnist",
    "fashion_mnist": "fmnist",
    "fashionmnist": "fmnist",
    "cifar-10": "cifar10",
    "cifar": "cifar10",
}
TWO_D_DEFAULT_N = {"train": 50_000, "test": 10_000}
SPLITS = ("train", "test")

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class DataError(UserError):
    """A user-facing, one-line problem with the data (missing, corrupt, unknown name)."""


def known_names() -> tuple[str, ...]:
    return IMAGE_NAMES + TWO_D_NAMES


@dataclass
class Dataset:
    name: str
    x: torch.Tensor                   # float32 [N, C, H, W] in [-1, 1], or [N, 2]
    labels: torch.Tensor | None       # int64 [N], None when unlabeled
    num_classes: int                  # 0 when unlabeled
    class_names: tuple[str, ...] | None = None   # optional, len == num_classes

    @property
    def shape(self) -> tuple:
        """Per-sample shape, e.g. (1, 28, 28) or (2,)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __post_init__(self) -> None:
        if self.labels is not None and self.labels.shape[0] != self.x.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for {self.x.shape[0]} samples")
        if (self.labels is None) != (self.num_classes == 0):
            raise ValueError("num_classes must be 0 exactly when labels is None")


# ----------------------------------------------------------------------------------------
# entry point


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset fully into memory.

    name: fmnist | mnist | cifar10 | gmm | moons | checkerboard | a folder of images.
    split: 'train' or 'test'.  data_dir: where the files are (fmnist defaults to the Debian
    package's folder; mnist and cifar10 require it).  limit: keep the first `limit` samples.
    seed: for the generated 2-D datasets.  image_size: resize images to this square size
    (folders default to the size of the first image; fmnist/mnist/cifar10 to native).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if key in TWO_D_NAMES:
        return _load_2d(key, split, limit, seed)
    if key == "fmnist":
        ds = _load_idx_dataset("fmnist", split, data_dir, limit)
    elif key == "mnist":
        ds = _load_idx_dataset("mnist", split, data_dir, limit)
    elif key == "cifar10":
        ds = _load_cifar10(split, data_dir, limit)
    else:
        path = Path(os.path.expanduser(str(name)))
        if path.is_dir():
            return _load_folder(path, split, limit, image_size)
        if path.exists():
            raise DataError(f"{name} is not a folder; give a dataset name ("
                            f"{', '.join(known_names())}) or a folder of images")
        raise DataError(f"unknown dataset {name!r} (and no such folder); known names: "
                        f"{', '.join(known_names())}, or a path to a folder of images")
    if image_size is not None and ds.x.shape[-1] != image_size:
        ds.x = _resize_tensor(ds.x, image_size)
    return ds


# ----------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or .gz): magic 0x0000TTNN, NN big-endian uint32 dims, data."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file (only {len(data)} bytes)")
    zero, tcode, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or tcode not in _IDX_DTYPES or ndim < 1:
        raise DataError(f"{path} is not an IDX file (bad magic number 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[tcode]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: header says dims {list(dims)} "
                        f"({expected} bytes), file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _idx_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_file(folder: Path, stem: str) -> Path | None:
    # the standard name, plain or gzipped; also the 'train-images.idx3-ubyte' spelling
    for s in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / s, folder / (s + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(key: str, split: str, data_dir: str | None, limit: int | None) -> Dataset:
    img_name, lab_name = _idx_names(split)
    wanted = f"{img_name}[.gz] and {lab_name}[.gz]"
    if data_dir is None:
        if key == "mnist":
            raise DataError(f"mnist needs --data-dir DIR: a folder holding {wanted} "
                            "(the standard MNIST files)")
        dirs = [Path(FMNIST_DIR)]
    else:
        root = Path(os.path.expanduser(str(data_dir)))
        sub = ["fashion-mnist", "FashionMNIST/raw"] if key == "fmnist" else ["mnist", "MNIST/raw"]
        dirs = [root] + [root / s for s in sub]
    for d in dirs:
        img_path, lab_path = _find_file(d, img_name), _find_file(d, lab_name)
        if img_path is not None and lab_path is not None:
            break
    else:
        looked = ", ".join(str(d) for d in dirs)
        if key == "fmnist":
            how = ("install it with `apt-get install dataset-fashion-mnist` "
                   "or pass --data-dir DIR holding those files")
        else:
            how = "pass --data-dir DIR holding the standard MNIST files"
        raise DataError(f"{key} {split} data not found: looked for {wanted} in {looked}; {how}")

    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{img_path}: expected unsigned-byte images [N, H, W], "
                        f"got {images.dtype} with {images.ndim} dims")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{lab_path}: expected unsigned-byte labels [N], "
                        f"got {labels.dtype} with {labels.ndim} dims")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                        f"{labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    if images.shape[0] == 0:
        raise DataError(f"{img_path} holds no images")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Dataset(
        name=key,
        x=_to_unit_range(images[:, None]),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        class_names=FMNIST_CLASSES if key == "fmnist" else MNIST_CLASSES,
    )


def _to_unit_range(a: np.ndarray) -> torch.Tensor:
    """uint8 array -> float32 tensor with 0 -> -1 and 255 -> 1."""
    x = torch.from_numpy(a.astype(np.float32, order="C"))  # always a fresh, writable copy
    return x.div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------
# CIFAR-10 (binary version: records of 1 label byte + 3072 bytes of CHW pixels)

_CIFAR_RECORD = 1 + 3 * 32 * 32


def _load_cifar10(split: str, data_dir: str | None, limit: int | None) -> Dataset:
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    hint = ("the binary version of CIFAR-10 (cifar-10-binary.tar.gz, files "
            "data_batch_1..5.bin and test_batch.bin)")
    if data_dir is None:
        raise DataError(f"cifar10 needs --data-dir DIR: a folder holding {hint}, "
                        "directly or in cifar-10-batches-bin/")
    root = Path(os.path.expanduser(str(data_dir)))
    dirs = [root, root / "cifar-10-batches-bin"]
    found: list[Path] = []
    for d in dirs:
        found = [d / n for n in names if (d / n).is_file()]
        if found:
            break
    if not found:
        looked = ", ".join(str(d) for d in dirs)
        pickled = (root / "data_batch_1").exists() or (root / "cifar-10-batches-py").exists()
        extra = (" (found the Python/pickle version, which is never loaded: "
                 "use the binary version)") if pickled else ""
        raise DataError(f"cifar10 {split} data not found: looked for {', '.join(names)} in "
                        f"{looked}{extra}; pass --data-dir DIR holding {hint}")
    if len(found) < len(names):
        missing = sorted(set(names) - {p.name for p in found})
        warnings.warn(f"cifar10: {', '.join(missing)} missing in {found[0].parent}; "
                      f"using {len(found)} of {len(names)} files", stacklevel=3)
    chunks = []
    total = 0
    for p in found:
        data = _read_bytes(p)
        if len(data) == 0 or len(data) % _CIFAR_RECORD:
            raise DataError(f"{p} is not a CIFAR-10 binary batch: size {len(data)} is not a "
                            f"multiple of {_CIFAR_RECORD} bytes")
        chunks.append(np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD))
        total += chunks[-1].shape[0]
        if limit is not None and total >= limit:
            break
    records = np.concatenate(chunks)[:limit]
    labels = records[:, 0]
    if int(labels.max()) >= 10:
        raise DataError(f"cifar10: label {int(labels.max())} out of range 0..9 in "
                        f"{', '.join(str(p) for p in found)}")
    return Dataset(
        name="cifar10",
        x=_to_unit_range(records[:, 1:].reshape(-1, 3, 32, 32)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        class_names=CIFAR10_CLASSES,
    )


# ----------------------------------------------------------------------------------------
# folder of images

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath) / f)
    return sorted(out)


def _split_root(root: Path, split: str) -> Path:
    """A folder with train/ (and test/ or val/) subfolders is split-structured."""
    subs = {p.name for p in root.iterdir() if p.is_dir()}
    if not ({"train", "test"} & subs):
        return root  # no split structure: both splits are the whole folder
    options = ["train"] if split == "train" else ["test", "val", "valid", "validation"]
    for o in options:
        if o in subs:
            return root / o
    raise DataError(f"{root} has split subfolders ({', '.join(sorted(subs))}) but none for "
                    f"the {split} split (expected {' or '.join(options)}/)")


def _decode_image(path: Path, size: int | None) -> np.ndarray:
    """Open one image -> uint8 [H, W] (grayscale) or [H, W, 3], center-cropped square and
    resized to `size` (None: keep the cropped size)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, ...)
        raise DataError(f"cannot read image {path}: {e}") from None
    mode = im.mode
    gray = mode in _GRAY_MODES
    if mode.startswith("I") or mode == "F":
        # high bit-depth grayscale: scale to 8 bits instead of clipping
        a = np.asarray(im, dtype=np.float64)
        peak = 1.0 if mode == "F" else (65535.0 if a.max(initial=0) > 255 or ";16" in mode
                                        else 255.0)
        im = Image.fromarray(np.clip(np.rint(a / peak * 255.0), 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in im.info:
        # composite transparent pixels onto white
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        im = bg.convert("L" if gray else "RGB")
    else:
        im = im.convert("L" if gray else "RGB")
    w, h = im.size
    s = min(w, h)
    if w != h:
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if size is not None and size != s:
        im = im.resize((size, size), Image.LANCZOS if size < s else Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _load_folder(root: Path, split: str, limit: int | None, image_size: int | None) -> Dataset:
    folder = _split_root(root, split)
    files = _image_files(folder)
    if not files:
        raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found "
                        f"in folder {folder}")
    # class labels from the top-level subfolders, when at least two of them hold images
    top = [f.relative_to(folder).parts for f in files]
    classes = sorted({p[0] for p in top if len(p) > 1})
    if len(classes) >= 2:
        loose = [f for f, p in zip(files, top) if len(p) == 1]
        if loose:
            warnings.warn(f"{folder}: ignoring {len(loose)} image(s) outside the class "
                          f"subfolders, e.g. {loose[0].name}", stacklevel=3)
        pairs = [(f, p[0]) for f, p in zip(files, top) if len(p) > 1]
        files = [f for f, _ in pairs]
        index = {c: i for i, c in enumerate(classes)}
        label_list = [index[c] for _, c in pairs]
    else:
        classes, label_list = [], None
    if limit is not None:
        files = files[:limit]
        label_list = label_list[:limit] if label_list is not None else None

    arrays: list[np.ndarray] = []
    size = image_size
    for f in files:
        a = _decode_image(f, size)
        if size is None:
            size = a.shape[0]
        arrays.append(a)
    if all(a.ndim == 2 for a in arrays):
        stacked = np.stack(arrays)[:, None]                        # [N, 1, S, S]
    else:
        stacked = np.stack([np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a
                            for a in arrays]).transpose(0, 3, 1, 2)  # [N, 3, S, S]
    del arrays
    labels = torch.tensor(label_list, dtype=torch.int64) if label_list is not None else None
    return Dataset(
        name=str(root.resolve()),
        x=_to_unit_range(stacked),
        labels=labels,
        num_classes=len(classes) if labels is not None else 0,
        class_names=tuple(classes) if labels is not None else None,
    )


def _resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [N, C, H, W] images in [-1, 1] to size x size (center-crop non-square)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=size < s)
    return out.clamp_(-1.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------------
# 2-D track (the generators are in training/data_2d.py)


def _generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *stream) through numpy's SeedSequence hashing."""
    entropy = [int(seed) % 2**63] + [int(s) for s in stream]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def _load_2d(key: str, split: str, limit: int | None, seed: int) -> Dataset:
    g = _generator(seed, 0, {"train": 0, "test": 1}[split])
    # always generate the full default N and slice: `limit` keeps the first samples
    x = sample_points(key, TWO_D_DEFAULT_N[split], g)[:limit].to(torch.float32).contiguous()
    return Dataset(name=key, x=x, labels=None, num_classes=0)


# ----------------------------------------------------------------------------------------
# deterministic, resumable minibatches


class Batches:
    """batch_at(step) is a pure function of (seed, step, rank, world).

    The sample stream is the concatenation of per-epoch permutations (epoch e uses a
    torch.Generator seeded from (seed, e)); global step k covers stream positions
    [k * batch * world, (k + 1) * batch * world), and rank r takes the r-th slice of
    `batch` positions. Batches wrap across epoch boundaries.
    """

    def __init__(self, ds: Dataset, batch: int, seed: int, rank: int = 0, world: int = 1):
        if len(ds) < 1:
            raise ValueError("empty dataset")
        if batch < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch >= 1, world >= 1, 0 <= rank < world; "
                             f"got batch={batch}, rank={rank}, world={world}")
        self.ds, self.batch, self.seed, self.rank, self.world = ds, batch, seed, rank, world
        self.n = len(ds)
        self._perms: dict[int, torch.Tensor] = {}

    def epoch_of(self, step: int) -> int:
        return (step * self.batch * self.world) // self.n

    def perm(self, epoch: int) -> torch.Tensor:
        p = self._perms.get(epoch)
        if p is None:
            p = torch.randperm(self.n, generator=_generator(self.seed, 1, epoch))
            if len(self._perms) >= 2:   # keep the current and the next epoch
                self._perms.pop(min(self._perms))
            self._perms[epoch] = p
        return p

    def indices_at(self, step: int) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        start = step * self.batch * self.world + self.rank * self.batch
        pos = torch.arange(start, start + self.batch, dtype=torch.int64)
        epochs, offsets = pos // self.n, pos % self.n
        out = torch.empty(self.batch, dtype=torch.int64)
        for e in torch.unique(epochs).tolist():
            m = epochs == e
            out[m] = self.perm(e)[offsets[m]]
        return out

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self.indices_at(step)
        y = self.ds.labels[idx] if self.ds.labels is not None else None
        return self.ds.x[idx], y
