"""The benchmarks: one package, run as modules from the repository root.

* ``python -m recipes.benchmarks.run all|memory|speed|convergence|report``: the side-by-side
  report of every optimizer (``measure``, ``convergence``, ``tasks``, ``roster``, ``report``).
* Deep dives of one optimizer family, whose figures are in BENCHMARKS.md:
  ``python -m recipes.benchmarks.microadam``, ``python -m recipes.benchmarks.shampoo``,
  ``python -m recipes.benchmarks.efcp`` and ``torchrun ... -m recipes.benchmarks.distributed``.
* ``python -m recipes.benchmarks.step_ab --baseline DIR``: step time of two checkouts.

Each takes ``--help``; the quick modes (``--quick``) are smoke runs. Shared code (the one LLaMA
builder, parameter sets, timing, machine info, peers path, child processes) is in ``common``.
"""
