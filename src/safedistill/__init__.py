"""safedistill: safety alignment by on-policy (self-)distillation, with an honest safety-tax report."""

__version__ = "0.1.0"
