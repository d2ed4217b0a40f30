"""The one seed scheme of the project.

Every random stream is seeded from the run's ``seed`` (``conf/config.yaml``) and a purpose with
its indices, never from the clock or from another stream's state:

==============================  =========================================================
stream                          seed
==============================  =========================================================
expert ``i``                    ``derive_seed(seed, "expert", i)``
evaluation network ``k`` of     ``derive_seed(seed, net, k)`` (``net`` = ``convnet``, ...)
an architecture
distillation pair draw          ``derive_seed(seed, "pairs", rank, iteration)``
distillation unroll (DSA, ...)  ``derive_seed(seed, "unroll", rank, iteration)``
initial synthetic images        ``derive_seed(seed, "init")``
DDPM training noise / batches   ``derive_seed(seed, "ddpm_noise" | "ddpm_batches", rank)``
DDPM sample draw ``j``          ``derive_seed(seed, "ddpm_sample", j)``
tabular reference rows         ``derive_seed(seed, "tabular_reference", name)``
PCA reference test images      ``derive_seed(seed, "pca_reference", name)``
ConvNet-KID subsets            ``derive_seed(seed, "kid")``
==============================  =========================================================

Strings are hashed with CRC-32, then NumPy's ``SeedSequence`` mixes all keys into a 63-bit
seed, so streams of different purposes or indices are statistically independent.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by ``keys`` (purpose strings and integer indices)."""
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, np.uint64)[0]
    return int(state >> np.uint64(1))
