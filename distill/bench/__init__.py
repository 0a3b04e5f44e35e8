"""The project benchmark (`make bench`): /work/shared/BENCHMARK.md's cases on the real code paths.

Modules: flops (the FLOP convention, device peaks), timing (step timer, compile counter, matmul
peak, versions), cases (the cases), cli (`python -m distill.bench`).
"""
