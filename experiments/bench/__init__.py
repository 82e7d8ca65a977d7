"""Benchmarks for hirl_ray (issue #6): `make bench`, `make bench-quick`."""
