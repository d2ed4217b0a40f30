"""DDPM maths in plain torch: noise schedules, forward process, loss, ancestral sampling,
optimiser steppers, sample-quality metrics and pictures. No Lightning or Hydra imports here,
so every piece runs (and is tested) on its own."""
