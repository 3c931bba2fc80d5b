"""Choosing which samples share a packed sequence: best-fit decreasing under a few limits.

Each pack holds at most `capacity` tokens and `max_images` images (the vision tower's memory grows
with images, not tokens), and optionally at most `max_samples` samples (the language layers' CUDA
graphs are captured for a fixed number of packed segments: model/attention.py). Best-fit
decreasing — longest sample first, into the pack it fills most tightly — wastes little on
long-tailed SFT length distributions; a sample longer than `capacity` gets a pack of its own (the
task encoder truncates or drops it before this point).
"""
import bisect
from typing import List, Optional, Sequence


def plan_packs(lengths: Sequence[int], image_counts: Sequence[int], capacity: int,
               max_images: int, max_samples: Optional[int] = None) -> List[List[int]]:
    """Groups of sample indices; every index appears in exactly one group."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: List[List[int]] = []
    room: List[int] = []          # tokens left per pack
    images: List[int] = []        # images held per pack
    by_room: List[tuple] = []     # sorted (room, pack index) for the best-fit search
    for index in order:
        need, pictures = lengths[index], image_counts[index]
        position = bisect.bisect_left(by_room, (need, -1))
        chosen = None
        while position < len(by_room):
            _, pack = by_room[position]
            if (images[pack] + pictures <= max_images
                    and (max_samples is None or len(packs[pack]) < max_samples)):
                chosen = pack
                break
            position += 1
        if chosen is None:
            packs.append([index])
            room.append(capacity - need)
            images.append(pictures)
            bisect.insort(by_room, (room[-1], len(packs) - 1))
            continue
        by_room.pop(position)
        packs[chosen].append(index)
        room[chosen] -= need
        images[chosen] += pictures
        bisect.insort(by_room, (room[chosen], chosen))
    return [sorted(pack) for pack in packs]


def packing_efficiency(lengths: Sequence[int], packs: List[List[int]], capacity: int) -> float:
    """Real tokens over the capacity of the packs used."""
    return sum(lengths) / (capacity * len(packs)) if packs else 0.0
