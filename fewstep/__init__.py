"""fewstep: few-step image generation, trained to served.

The layers `training`, `export`, `serving` and `demo` are subpackages of this one
(`fewstep.training`, ...), so an install puts one name, `fewstep`, into site-packages. In the
repository they sit beside this folder, at the top level (the project's layout); an install
maps them in (pyproject.toml's package-dir), and a checkout run without one finds them here.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

_here = _Path(__file__).resolve().parent
if not (_here / "training").is_dir() and (_here.parent / "training" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - a package's own __path__
