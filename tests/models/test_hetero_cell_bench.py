"""The training-step benchmark's memory watchdog: a step that outgrows its limit is stopped and
reported, not run to an out-of-memory kill."""

from stoichconv.bench.hetero_cell_cases import LARGE_BATCH, LARGE_BATCH_HEADS, peak_in_subprocess


def test_a_step_over_the_limit_is_stopped():
    result = peak_in_subprocess("reference", 2, 8, 1, heads=2, limit_mb=60)  # importing torch passes 60 MB
    assert result["fits"] is False
    assert result["peak_rss_mb"].startswith(">") and result["peak_rss_mb"].endswith("(stopped)")


def test_the_original_batch_size_rows_are_declared():
    assert LARGE_BATCH == 32 and set(LARGE_BATCH_HEADS) == {2, 10}


def test_a_step_timed_in_a_fresh_process_returns_its_median_and_first_predictions():
    """The B = 32 reference rows are timed in a process of their own: the median of the timed
    steps comes back with the warm-up step's predictions, equal to those of the same step here."""
    import torch

    from stoichconv.bench.hetero_cell_cases import _setup, _step_fn, time_in_subprocess

    result = time_in_subprocess("reference", 2, 8, 1, 2, repeats=2)
    assert result["repeats"] == 2 and result["median_ms"] > 0 and result["step_s"] > 0
    torch.set_num_threads(1)
    expected = _step_fn("reference", *_setup("reference", 2, 8, torch.device("cpu"), heads=2))()
    torch.testing.assert_close(result["output"], expected, rtol=0, atol=0)


def test_a_timed_step_over_the_limit_is_stopped():
    from stoichconv.bench.hetero_cell_cases import time_in_subprocess

    result = time_in_subprocess("reference", 2, 8, 1, 2, repeats=1, limit_mb=60)
    assert result["fits"] is False and result["peak_rss_mb"].endswith("(stopped)")
