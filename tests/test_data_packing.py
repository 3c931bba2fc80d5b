"""Pack planning: limits always hold, every sample is used once, and little space is wasted."""
import random

from megatron_patch.data.packing import packing_efficiency, plan_packs


def long_tailed_lengths(count, seed=0, capacity=8192):
    """Lognormal token lengths, like real SFT mixes (many short answers, a tail of long ones)."""
    rng = random.Random(seed)
    return [min(capacity, max(16, int(rng.lognormvariate(6.3, 0.9)))) for _ in range(count)]


def test_limits_hold_and_every_sample_is_used_once():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    images = [rng.randint(0, 3) for _ in range(500)]
    packs = plan_packs(lengths, images, capacity=256, max_images=5)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    for pack in packs:
        assert sum(lengths[i] for i in pack) <= 256
        assert sum(images[i] for i in pack) <= 5


def test_oversized_sample_gets_its_own_pack():
    packs = plan_packs([300, 10, 10], [0, 0, 0], capacity=256, max_images=4)
    assert [0] in packs and sorted(i for p in packs for i in p) == [0, 1, 2]


def test_efficiency_above_95_percent_on_long_tailed_lengths():
    lengths = long_tailed_lengths(2000)
    packs = plan_packs(lengths, [1] * len(lengths), capacity=8192, max_images=64)
    assert packing_efficiency(lengths, packs, 8192) > 0.95


def test_image_cap_binds_before_tokens_do():
    packs = plan_packs([10] * 40, [2] * 40, capacity=1000, max_images=8)
    assert all(len(pack) == 4 for pack in packs) and len(packs) == 10


def test_sample_cap_binds_when_given():
    """--max-samples-per-pack (the fixed segment count of CUDA graphs): short samples that
    would share one pack are spread over packs of at most that many; without it, no limit."""
    assert len(plan_packs([10] * 40, [0] * 40, capacity=1000, max_images=8)) == 1
    packs = plan_packs([10] * 40, [0] * 40, capacity=1000, max_images=8, max_samples=6)
    assert max(len(pack) for pack in packs) == 6 and len(packs) == 7
    assert sorted(i for pack in packs for i in pack) == list(range(40))
    # at the default cap (63) the long-tailed mix packs as well as without one
    lengths = long_tailed_lengths(2000)
    capped = plan_packs(lengths, [1] * len(lengths), capacity=8192, max_images=64, max_samples=63)
    assert packing_efficiency(lengths, capped, 8192) > 0.95
