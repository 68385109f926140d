"""The world's random numbers: splitmix64, seeded by hashing a key.

Chosen over `random.Random` and numpy generators because seeding is one multiply-xor
chain (items are drawn by index, so every item seeds its own generator) and because the
algorithm is fixed here: the same seed gives the same world on every platform and Python
or numpy version, which the memory, the checkpoints and the eval all rely on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def mix64(z: int) -> int:
    """The splitmix64 finaliser: a bijection on 64-bit ints that scatters nearby inputs."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def key_hash(*key: object) -> int:
    """A stable 64-bit hash of a key such as ("world", seed) (unlike the salted `hash`)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Rng:
    __slots__ = ("_state",)

    def __init__(self, state: int) -> None:
        # Scatter the start state: seeding consecutive ints must not give overlapping
        # streams (splitmix steps its state by a constant).
        self._state = mix64(state & _MASK)

    @classmethod
    def from_key(cls, *key: object) -> Rng:
        return cls(key_hash(*key))

    def next64(self) -> int:
        self._state = (self._state + _GAMMA) & _MASK
        return mix64(self._state)

    def random(self) -> float:
        """Uniform float in [0, 1)."""
        return (self.next64() >> 11) * (1.0 / (1 << 53))

    def below(self, n: int) -> int:
        """Uniform int in [0, n) (multiply-shift; the bias is below 2**-40 for our n)."""
        return (self.next64() * n) >> 64

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        """`k` distinct elements in random order (partial Fisher-Yates)."""
        pool = list(seq)
        if not 0 <= k <= len(pool):
            raise ValueError(f"cannot sample {k} of {len(pool)}")
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]
