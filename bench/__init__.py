"""Sluice's benchmarks: gateway overhead, behaviour under overload, batching gains.

Run them with `make bench` or `python -m bench [overhead|overload|batching]`; each writes
bench/results/<name>.md and its plots. They measure and report; they never assert a time.
"""
