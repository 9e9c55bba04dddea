"""Benchmarks of the ISDNet engine (``isdnet-bench``): accuracy against the paper's ablation, and speed.

A client of the engine like any other front end: nothing in ``isdnet`` imports this package.
"""
