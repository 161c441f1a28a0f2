"""The lab's report module: the fewer-steps frontier and the tables."""

from accel.lab.report import pareto_frontier


def test_the_frontier_keeps_the_best_quality_at_each_speedup_and_only_non_dominated_points():
    points = [(8.33, 29.38), (8.33, 32.21), (6.25, 34.67), (6.25, 32.11), (12.5, 25.31), (10.0, 24.0), (4.17, 33.0)]
    assert pareto_frontier(points) == [(6.25, 34.67), (8.33, 32.21), (12.5, 25.31)]
