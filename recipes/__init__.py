"""Recipes: the main job (``finetune_llama``) and the benchmarks (``benchmarks``).

Run them from the repository root, as modules (``python -m recipes.finetune_llama``,
``python -m recipes.benchmarks.run all --quick``); ``recipes/finetune_llama.py`` also runs as a
plain script, so ``torchrun`` and ``accelerate launch`` can be given its path.
"""
