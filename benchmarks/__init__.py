"""Speed and memory benchmarks (pytest-benchmark): `python -m pytest --benchmark-only benchmarks/`."""
