"""Evaluation of models: held-out SFT and preference metrics (``metrics``), lm-evaluation-harness tasks
(``harness``), reward-model, pairwise-judge and harmlessness metrics on greedy replies (``judges``),
all run per model by ``models.evaluate_models``; ``standalone`` serves ``paft eval MODEL...``."""
