"""The training benchmark behind ``benchmarks/bench_train.py``: the harness, the contenders,
the sections and the rendering of the README table, one module each."""
