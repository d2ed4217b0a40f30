"""Dataset condensation in plain torch (no Lightning, no Hydra).

``dsa`` (differentiable siamese augmentation), ``experts`` (expert training), ``unroll`` (the
student's unrolled training), ``matching`` (trajectory matching + parameter pruning),
``coresets`` (random / herding / forgetting selection) and ``evaluation`` (train fresh networks on
a set, report real test accuracy).
"""
