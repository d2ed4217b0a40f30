"""LightningModules and the plain-torch pieces they own.

Subpackages (``nets``, ``tt``, ...) import torch only, never Lightning or Hydra, so the maths
can be reused and tested on its own. ``tasks`` holds one runner per ``task=`` choice.
"""
