"""A1111's "NV" noise source: the numbers ``torch.randn`` gives on an NVIDIA GPU for a seed, computed on the CPU.

PyTorch's CUDA generator is Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) keyed by the seed; element i of a draw takes counter (offset, 0, i, 0), and one normal comes from the
first two 32-bit outputs by the Box-Muller transform, in float32. A1111 draws its noise this way when its "Random
number generator source" is NV (and, on NVIDIA cards, GPU), so an A1111 seed gives A1111's starting noise here,
on any machine. Each later draw from the same generator moves the offset by one.
"""

from __future__ import annotations

import numpy as np

_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_KEY_STEPS = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_ROUNDS = 10
_INV_2_32 = np.float32(2.3283064e-10)  # 2**-32, as float32
_INV_2_32_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _mulhilo(a: np.ndarray, multiplier: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    product = a.astype(np.uint64) * multiplier
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox 4x32-10 of ``counter`` [4, n] under ``key`` [2, n] (uint32): four random words per column."""
    c = [counter[i].copy() for i in range(4)]
    k0, k1 = key[0].copy(), key[1].copy()
    with np.errstate(over="ignore"):
        for round_ in range(_ROUNDS):
            if round_:
                k0 = k0 + _KEY_STEPS[0]
                k1 = k1 + _KEY_STEPS[1]
            hi0, lo0 = _mulhilo(c[0], _MULTIPLIERS[0])
            hi1, lo1 = _mulhilo(c[2], _MULTIPLIERS[1])
            c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return np.stack(c)


def nv_randn(seed: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """Standard normal float32 numbers of ``shape``, as ``torch.randn(shape, device="cuda")`` gives them after
    ``torch.manual_seed(seed)`` (``offset``: how many draws that generator made before)."""
    n = int(np.prod(shape))
    counter = np.zeros((4, n), dtype=np.uint32)
    counter[0] = np.uint32(offset)
    counter[2] = np.arange(n, dtype=np.uint32)
    key = np.array([[seed & 0xFFFFFFFF], [(seed >> 32) & 0xFFFFFFFF]], dtype=np.uint32).repeat(n, axis=1)
    words = philox4x32(counter, key)
    # the transform in float64 from float32 constants, rounded to float32 at the end (A1111's reference numbers)
    scale, scale_2pi = np.float64(_INV_2_32), np.float64(_INV_2_32_2PI)
    u = words[0].astype(np.float64) * scale + scale / 2
    v = words[1].astype(np.float64) * scale_2pi + scale_2pi / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)
