"""Benchmarks for jobserver and its peers (Huey, Celery, RQ). See bench/README.md."""
