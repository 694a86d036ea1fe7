"""sse_handler's benchmarks against its peers: ``python -m bench`` (see ``__main__``).

Never part of the test suite: tests assert behaviour, benchmarks report numbers.
"""
