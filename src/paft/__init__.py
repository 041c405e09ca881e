"""paft: PArallel training for effective LLM Fine-Tuning.

Train an SFT branch and a preference branch independently from one base model,
sparsify the SFT delta with an L1 penalty, merge both deltas with an
interference-resolving method, and compare with the sequential SFT->preference
baseline in the same run.
"""

__version__ = "0.1.0"
