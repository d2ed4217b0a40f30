"""Plain-torch networks: CIFAR classifiers and DDPM noise models (no Lightning, no Hydra)."""

from lightning_modules.nets.classifiers import CLASSIFIERS, build_classifier
from lightning_modules.nets.functional import FlatParams

__all__ = ["CLASSIFIERS", "FlatParams", "build_classifier"]
