"""Benchmarks: the workload driver (workload.py) and the side-by-side run (run.py)."""
