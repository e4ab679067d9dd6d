from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.ledger import AppliedLedger


def test_watermark_and_duplicates() -> None:
    led = AppliedLedger()
    assert not led.seen("a", 1)
    led.record("a", 1)
    led.record("a", 2)
    assert led.seen("a", 1) and led.seen("a", 2)
    assert not led.seen("a", 3)
    assert not led.seen("b", 1)
    assert led.watermark("a") == 2


def test_out_of_order_seq_is_applied_once_and_gap_closes() -> None:
    led = AppliedLedger()
    led.record("a", 1)
    led.record("a", 3)  # 2 was overtaken
    assert led.seen("a", 3)
    assert not led.seen("a", 2)
    assert led.watermark("a") == 1
    led.record("a", 2)
    assert led.watermark("a") == 3
    assert led.snapshot() == {"mark": {"a": 3}, "above": {}}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("xyz"), st.integers(1, 20)), max_size=60))
def test_matches_a_set_and_survives_snapshots(records: list[tuple[str, int]]) -> None:
    led = AppliedLedger()
    seen: set[tuple[str, int]] = set()
    for src, seq in records:
        assert led.seen(src, seq) == ((src, seq) in seen)
        led.record(src, seq)
        seen.add((src, seq))
    copy = AppliedLedger.from_snapshot(led.snapshot())
    again = AppliedLedger.from_records(records)
    for src in "xyz":
        for seq in range(1, 22):
            expected = (src, seq) in seen
            assert copy.seen(src, seq) == expected
            assert again.seen(src, seq) == expected
