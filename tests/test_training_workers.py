"""Worker sizing and equal shards for the smaller trainers (aligners, DPO)."""

from mote_ray.training.workers import equal_shard


def test_every_rank_gets_the_same_number_of_rows():
    rows = list(range(11))
    shards = [equal_shard(rows, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # the old rows[rank::world] gave 4, 4, 3: DDP hangs
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    assert equal_shard([1], 1, 2) == [1]  # fewer rows than ranks: every rank trains on what there is
