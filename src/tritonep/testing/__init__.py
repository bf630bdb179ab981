"""Helpers shipped for tests and benchmarks.

`tritonep.testing.dist` holds the multi-process harness (`RankPool`, `get_pool`, ...). It is not
imported here so that `import tritonep.testing` stays cheap and never starts processes.
"""
