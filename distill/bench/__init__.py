"""The project benchmark (`make bench`): its cases on the real code paths.

Specification (shapes, cases, FLOP convention, timing, targets) and results:
experiments/bench/README.md.

Modules: flops (the FLOP convention, device peaks), timing (step timer, compile counter, matmul
peak, versions), cases (the cases), cli (`python -m distill.bench`).
"""
