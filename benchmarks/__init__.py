"""Benchmarks and paper reproductions; run them as modules from the repository root:
`python -m benchmarks.speed.decode`, `python -m benchmarks.paper.reproduce_v2` (see docs/RESULTS.md)."""
