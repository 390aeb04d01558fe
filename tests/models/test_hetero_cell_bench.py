"""The training-step benchmark's memory watchdog: a step that outgrows its limit is stopped and
reported, not run to an out-of-memory kill."""

from stoichconv.bench.hetero_cell_cases import LARGE_BATCH, LARGE_BATCH_HEADS, peak_in_subprocess


def test_a_step_over_the_limit_is_stopped():
    result = peak_in_subprocess("reference", 2, 8, 1, heads=2, limit_mb=60)  # importing torch passes 60 MB
    assert result["fits"] is False
    assert result["peak_rss_mb"].startswith(">") and result["peak_rss_mb"].endswith("(stopped)")


def test_the_original_batch_size_rows_are_declared():
    assert LARGE_BATCH == 32 and set(LARGE_BATCH_HEADS) == {2, 10}
