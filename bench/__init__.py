"""Benchmarks runnable by users: C{python -m bench.overhead}, and friends."""
