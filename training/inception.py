"""Inception-v3 FID features for `fewstep eval --feature inception`, from a local TorchScript
file only (nothing is downloaded)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fewstep.errors import UserError


class InceptionFeatures:
    """A TorchScript Inception-v3 feature extractor loaded from a local file, called as
    `net(images_uint8_NCHW_3ch, return_features=True)` (the convention of the FID detector
    that StyleGAN/EDM use, `inception-2015-12-05`, saved with torch.jit.save) or, failing
    that keyword, `net(images)`; it returns features [N, D]."""

    def __init__(self, path, device="cpu"):
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise UserError(f"--inception-weights {self.path}: no such file (Inception weights are "
                            "not available offline; give a local TorchScript file)")
        try:
            with warnings.catch_warnings():   # torch.jit.load is deprecated, still the format in use
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except Exception as e:  # torch raises RuntimeError/ValueError for non-TorchScript files
            raise UserError(f"--inception-weights {self.path}: not a TorchScript module "
                            f"({str(e).splitlines()[0][:160]})") from None
        self.device = device
        self._kw = True

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 200) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(self.device, torch.float32)
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            img = ((xb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            if self._kw:
                try:
                    f = self.net(img, return_features=True)
                except (RuntimeError, TypeError):
                    self._kw = False
            if not self._kw:
                f = self.net(img)
            if isinstance(f, (tuple, list)):
                f = f[0]
            out.append(f.reshape(f.shape[0], -1).float().cpu())
        return torch.cat(out)
