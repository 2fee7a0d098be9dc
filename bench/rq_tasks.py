"""The RQ job function for the benchmarks (imported by the worker by its dotted name)."""


def noop():
    return None
