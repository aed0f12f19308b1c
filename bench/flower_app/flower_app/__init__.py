"""Minimal Flower app timed by ``bench/bench_round_overhead.py``."""
