"""The catalog: every method as data. Loss functions with their equation and paper, schedules, merge-method specs.

Pure math and tables (torch and paft.errors only), so the config schema can validate names against them
from below, and train/merge/eval read them instead of testing method names.
"""
