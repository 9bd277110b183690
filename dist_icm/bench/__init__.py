"""Benchmarks: ``python -m dist_icm.bench NAME`` (see ``__main__``)."""
