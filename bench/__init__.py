"""Benchmarks for unblock: `make bench` (= `python -m bench`).

Every benchmark prints a ratio against a baseline measured in the same run on the same machine;
nothing here asserts an absolute timing. See bench/README.md.
"""
