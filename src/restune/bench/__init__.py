"""Benchmarks: ``restune bench memory | speed | multitask`` (see ``restune.bench.run``)."""
