from hypothesis import given
from hypothesis import strategies as st

from sgdjob.slicing import partition


@given(total=st.integers(0, 10**7), shards=st.integers(1, 300))
def test_slices_cover_the_vector_exactly_once_and_differ_by_at_most_one(
    total: int, shards: int
) -> None:
    slices = partition(total, shards)
    assert [s.shard for s in slices] == list(range(shards))
    covered = 0
    for s in slices:
        assert s.offset == covered  # contiguous, in shard order, no gap and no overlap
        covered = s.end
    assert covered == total
    counts = [s.count for s in slices]
    assert max(counts) - min(counts) <= 1


def test_a_partition_rejects_zero_shards() -> None:
    import pytest

    with pytest.raises(ValueError, match="shards"):
        partition(10, 0)
