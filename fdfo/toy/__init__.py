"""Toy conditional rectified flows with a closed-form velocity, for testing FDFO against its baselines on CPU.

`python -m fdfo.toy --help` runs one method; `python -m fdfo.toy.sweep` runs the tuning sweep and the comparison of
docs/toy.md. Modules: flows (problem, exact velocity, rewards, residual net), methods (the four training methods),
run (training loop, evaluation, direction analysis, JSON and plots).
"""
