"""Training: one Trainer subclass serves both branches; objectives differ."""
