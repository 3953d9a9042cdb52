"""splitmix64's finaliser: the one stable 64-bit mix behind every seeded choice in the data.

Record order, split membership, window randomness and the synthetic world are all hashes of
their keys through these functions (fixed by this code, not by a NumPy version).
"""

from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the increment between stream elements
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MIX1_U, _MIX2_U = np.uint64(MIX1), np.uint64(MIX2)
_S27, _S30, _S31, _S11 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(11)


def mix64_int(z: int) -> int:
    """The finaliser on a Python int (a few times cheaper than numpy on one value)."""
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def mix64_inplace(z: np.ndarray) -> np.ndarray:
    """The finaliser on a uint64 array, in place; returns it."""
    with np.errstate(over="ignore"):
        z ^= z >> _S30
        z *= _MIX1_U
        z ^= z >> _S27
        z *= _MIX2_U
        z ^= z >> _S31
    return z


def mix64(x) -> np.ndarray:
    """The finaliser on a uint64 array (or scalar), as a new array."""
    return mix64_inplace(np.array(x, np.uint64, copy=True))


def unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniforms in [0, 1) (the top 53 bits)."""
    return (np.asarray(h, np.uint64) >> _S11).astype(np.float64) * (1.0 / (1 << 53))
