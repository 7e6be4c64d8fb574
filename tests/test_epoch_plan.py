"""Epoch plans: every example once, shards interleaved in tar order, a bounded shuffle buffer."""
import numpy as np

from pipeline.train.epoch_plan import epoch_shards, interleave, make_plan, philox, shuffle_buffer


def test_interleave_takes_every_example_once_each_shard_in_tar_order():
    positions = {0: np.array([0, 2, 3]), 1: np.arange(5), 2: np.array([1, 4]), 3: np.arange(4)}
    shard, position, crop = interleave([3, 0, 1, 2], positions, crops=2, window=2, rng=philox("t"))
    assert len(shard) == 2 * (3 + 5 + 2 + 4)
    for s, usable in positions.items():
        mine = shard == s
        assert np.array_equal(position[mine], np.repeat(usable, 2))  # tar order, crops adjacent
        assert np.array_equal(crop[mine], np.tile([0, 1], len(usable)))
    # Windows of two: shards 3 and 0 are read before 1 and 2, and are interleaved.
    assert set(shard[:14].tolist()) == {3, 0} and set(shard[14:].tolist()) == {1, 2}
    assert not np.array_equal(shard[:14], np.sort(shard[:14]))


def test_shuffle_buffer_is_a_permutation_never_reading_more_than_its_size_ahead():
    emit = shuffle_buffer(1000, 64, philox("b"))
    assert sorted(emit.tolist()) == list(range(1000))
    assert (emit < np.arange(1000) + 64).all()
    assert np.abs(emit - np.arange(1000)).mean() > 10  # it does move things
    assert sorted(shuffle_buffer(5, 64, philox("small")).tolist()) == list(range(5))  # fewer items than the buffer


def test_plans_depend_only_on_their_key():
    positions = {s: np.arange(7) for s in range(6)}
    a = make_plan([0, 1, 2, 3, 4, 5], positions, 1, 3, 10, philox("plan", 0, 1, 0))
    b = make_plan([0, 1, 2, 3, 4, 5], positions, 1, 3, 10, philox("plan", 0, 1, 0))
    c = make_plan([0, 1, 2, 3, 4, 5], positions, 1, 3, 10, philox("plan", 0, 2, 0))
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("shard", "position", "crop", "emit"))
    assert not np.array_equal(a.shard[a.emit], c.shard[c.emit])
    evaluation = make_plan([0, 1], positions, 1, 3, 10, None)
    assert np.array_equal(evaluation.emit, np.arange(14)) and np.array_equal(evaluation.shard, [0] * 7 + [1] * 7)


def test_ranks_split_each_epochs_shards():
    parts = [epoch_shards(list(range(10)), seed=0, epoch=3, rank=r, world_size=3, shuffle=True) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    assert epoch_shards(list(range(10)), 0, 4, 0, 3, True) != parts[0]
