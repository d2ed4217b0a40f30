"""ConvNet-FID and ConvNet-KID of image samples: torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with a feature network the project trains itself.

The features are those of a local file (``ddpm.feature_extractor``): a ``torch.export`` archive
(``.pt2``, what ``task=classify`` writes: the penultimate layer of its classifier) or a
TorchScript file, mapping images ``[N, 3, H, W]`` in [0, 1] to ``[N, F]``. Nothing is
downloaded. Values depend on that network, so they are labelled ConvNet-FID / ConvNet-KID and are
comparable only between runs scored with the same file, never with published (Inception) FIDs.

torchmetrics takes any ``nn.Module`` as ``feature``; with ``normalize=True`` it passes float
images unchanged to it, and a ``num_features`` attribute spares it the probe call on a random
image. FID keeps its sums in float64; KID draws its subsets with the global torch generator, so
it runs inside ``torch.random.fork_rng`` seeded from ``derive_seed(seed, "kid")``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.errors import UserError
from lightning_modules.utils.seeds import derive_seed


def load_feature_extractor(path: str | Path) -> nn.Module:
    """The network in a ``.pt2`` (torch.export) or TorchScript file; UserError when missing or
    unreadable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"ddpm.feature_extractor={p} does not exist (a .pt2 torch.export or TorchScript file)"
        )
    try:
        if p.suffix == ".pt2":
            return torch.export.load(str(p)).module()
        return torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise UserError(
            f"ddpm.feature_extractor={p} could not be loaded ({type(e).__name__}); "
            "give a torch.export (.pt2) or TorchScript file"
        ) from None


class FeatureNet(nn.Module):
    """The ``feature`` module given to torchmetrics: float64 features ``[N, F]`` of images in
    [0, 1], extracted in batches. The last input's features are kept, so FID and KID, each
    calling it on the same tensor, run the network once."""

    def __init__(self, net: nn.Module, num_features: int, batch_size: int = 250):
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        self.batch_size = batch_size
        self._last: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is images01:
            return self._last[1]
        parts = [
            self.net(images01[i : i + self.batch_size].float()).reshape(
                len(images01[i : i + self.batch_size]), -1
            )
            for i in range(0, len(images01), self.batch_size)
        ]
        feats = torch.cat(parts).double()
        self._last = (images01, feats)
        return feats


def feature_network(path: str | Path, image_shape: tuple[int, ...] = (3, 32, 32)) -> FeatureNet:
    """Load the file and probe it with two images: it must give ``[2, F]`` finite features."""
    net = load_feature_extractor(path)
    try:
        with torch.no_grad():
            probe = net(torch.rand(2, *image_shape))
    except Exception as e:
        raise UserError(
            f"ddpm.feature_extractor={path} does not take images of shape [N, "
            f"{', '.join(map(str, image_shape))}] ({type(e).__name__})"
        ) from None
    if probe.ndim < 2 or probe.shape[0] != 2 or not torch.isfinite(probe).all():
        raise UserError(
            f"ddpm.feature_extractor={path} gives {tuple(probe.shape)} outputs, not finite [N, F]"
        )
    return FeatureNet(net, probe.reshape(2, -1).shape[1])


def convnet_fid(fake01: Tensor, real01: Tensor, feature: FeatureNet) -> float:
    """torchmetrics FID of two image sets on ``feature``'s features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature, normalize=True)
    fid.update(real01, real=True)
    fid.update(fake01, real=False)
    return float(fid.compute())


def convnet_kid(
    fake01: Tensor, real01: Tensor, feature: FeatureNet, *, subsets: int, subset_size: int, seed
) -> tuple[float, float]:
    """torchmetrics KID (mean, std over ``subsets`` random subsets of ``subset_size``)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(fake01), len(real01))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=feature, subsets=subsets, subset_size=size, normalize=True
        )
    kid.update(real01, real=True)
    kid.update(fake01, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "kid"))
        mean, std = kid.compute()
    return float(mean), float(std)


def convnet_scores(
    samples01: Tensor,
    real01: Tensor | None,
    path: str | None,
    *,
    floor01: Tensor | None = None,
    kid_subsets: int,
    kid_subset_size: int,
    seed: int,
) -> dict:
    """ConvNet-FID/KID of ``samples01`` against as many ``real01`` images (the first n); with
    ``floor01`` (other real images, e.g. the train split) also the same scores real vs real
    (``convnet_fid_real``, ``convnet_kid_real``): what a perfect model would get at this n."""
    if not path:
        return {"convnet_fid": None, "convnet_kid": None, "fid_note": "no feature extractor"}
    if real01 is None or len(real01) < 2:
        return {"convnet_fid": None, "convnet_kid": None, "fid_note": "no test images"}
    n = min(len(samples01), len(real01))
    if n < 2:
        raise UserError(f"ConvNet-FID needs at least 2 samples (ddpm.num_samples gives {n})")
    feature = feature_network(path, tuple(samples01.shape[1:]))
    real, fake = real01[:n], samples01[:n]
    kid_options = {"subsets": kid_subsets, "subset_size": kid_subset_size, "seed": seed}
    out = {"convnet_fid": convnet_fid(fake, real, feature)}
    out["convnet_kid"], out["convnet_kid_std"] = convnet_kid(fake, real, feature, **kid_options)
    if floor01 is not None and len(floor01) >= n:
        other = floor01[:n]
        out["convnet_fid_real"] = convnet_fid(other, real, feature)
        out["convnet_kid_real"] = convnet_kid(other, real, feature, **kid_options)[0]
    note = f"features: {path} (ConvNet-FID/KID: comparable within the project only)"
    return {**out, "fid_samples": n, "fid_features": str(path), "fid_note": note}


def scores_line(m: dict) -> str:
    """One log line for :func:`convnet_scores`' result."""
    if m.get("convnet_fid") is None:
        return f"ConvNet-FID/KID: not computed: {m.get('fid_note')}"
    line = f"ConvNet-FID {m['convnet_fid']:.3f}  ConvNet-KID {m['convnet_kid']:.5f}"
    if "convnet_fid_real" in m:
        line += (
            f"  (real vs real: FID {m['convnet_fid_real']:.3f}, KID {m['convnet_kid_real']:.5f})"
        )
    return line + f"  ({m['fid_samples']} vs {m['fid_samples']} test images)"
