"""Evaluation of models on held-out SFT and preference data."""
