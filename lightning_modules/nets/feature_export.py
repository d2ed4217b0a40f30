"""The feature-extractor file ``task=classify`` writes: a trained classifier's penultimate layer
as a ``torch.export`` program, for the ConvNet-FID/KID of ``task=ddpm``.

File format (``feature_extractor.pt2``, ``torch.export.save``): one program whose input is a
batch of images ``[N, C, H, W]`` in [0, 1] (float32, any N from 1 to 65536) and whose output is
``[N, F]`` float32 features: the classifier's own input map (the datamodule's mean/std or ZCA,
stored in the program as constants) followed by ``net.embed`` (for ConvNet-3 width 128 on 32 px
images, F = 128·4·4 = 2048). Load it with ``torch.export.load(path).module()``; nothing else
(no project code) is needed to run it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.utils.files import atomic_path

MAX_BATCH = 65536


class ImageFeatures(nn.Module):
    """[0, 1] images → the classifier's input space (mean/std or ZCA) → ``net.embed``.

    Args:
        net: a classifier with an ``embed(x) -> [N, F]`` method (every ``net=`` here has one).
        transform_state: ``PixelTransform.state_dict()`` of the datamodule the net was trained on.
    """

    def __init__(self, net: nn.Module, transform_state: dict):
        super().__init__()
        self.net = net
        self.zca = transform_state["kind"] == "zca"
        self.register_buffer("mean", torch.as_tensor(transform_state["mean"]).float())
        key = "matrix" if self.zca else "std"
        self.register_buffer("scale", torch.as_tensor(transform_state[key]).float())

    def forward(self, images01: Tensor) -> Tensor:
        if self.zca:
            flat = images01.reshape(images01.shape[0], -1) - self.mean
            x = (flat @ self.scale.T).reshape(images01.shape)
        else:
            x = (images01 - self.mean.view(1, -1, 1, 1)) / self.scale.view(1, -1, 1, 1)
        return self.net.embed(x).flatten(1)


def export_feature_extractor(
    net: nn.Module, transform_state: dict, path: str | Path, image_shape: tuple[int, int, int]
) -> Path:
    """Write ``net``'s penultimate layer behind its input map as a ``.pt2`` file (module doc)."""
    module = ImageFeatures(copy.deepcopy(net).cpu().float(), transform_state).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.rand(2, *image_shape)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return Path(path)
