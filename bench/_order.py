"""The order in which the benches race their variants.

At the sizes these benches time, a variant's time depends on the variant run
just before it (the state of the allocator and the caches it leaves). A
fixed order gives each variant one predecessor for good; so does, in all but
one place of each round, an order that rotates every round (bench_peers: our
query-document loss at B = 128 read 408 us in one rotation and 337 us in
another). A fresh random order each round gives every variant every
predecessor; it is seeded, so every run of a bench times the same schedule.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def rounds(variants: Sequence[T], repeats: int, seed: int = 0) -> Iterator[tuple[int, list[T]]]:
    """``(round, variants in that round's order)`` for ``repeats + 1`` rounds;
    round 0 is the warm-up, which the benches do not count."""
    schedule = random.Random(seed)
    order = list(variants)
    for round_ in range(repeats + 1):
        schedule.shuffle(order)
        yield round_, list(order)
