"""The fairness bench's arithmetic: the flood's rate inside the users' window, and against the capacity they left."""

from bench.fairness import compare, window_rate


def test_the_window_counts_only_the_requests_that_ended_inside_it() -> None:
    flood = {"ends": [(0.5, 0.3), (1.0, 0.3), (2.0, 0.5), (3.5, 0.3), (4.0, 0.3)]}
    assert window_rate(flood, 1.0, 4.0) == {
        "window_seconds": 3.0,
        "window_requests": 4,
        "window_per_minute": 80.0,
        "window_service_mean": 0.35,
    }
    assert window_rate(flood, 5.0, 6.0)["window_service_mean"] is None


def test_the_users_share_of_the_slots_is_not_counted_as_the_floods_loss() -> None:
    results = {
        "alone": {"flood": {"per_minute": 400.0, "window_per_minute": 400.0}},
        "fifo": {"flood": {"per_minute": 380.0, "window_per_minute": 390.0}, "interactive": {"share_of_slots": 0.025}},
        "fair": {"flood": {"per_minute": 340.0, "window_per_minute": 300.0}, "interactive": {"share_of_slots": 0.25}},
    }
    compare(results)
    assert results["fifo"]["flood"] == {
        "per_minute": 380.0, "window_per_minute": 390.0,
        "vs_alone": 0.95, "window_vs_alone": 0.975, "window_vs_alone_on_capacity_left": 1.0,
    }
    assert results["fair"]["flood"]["window_vs_alone"] == 0.75
    assert results["fair"]["flood"]["window_vs_alone_on_capacity_left"] == 1.0
