"""shear: targeted structured pruning (Sheared LLaMA) of LLaMA-family models."""

__version__ = "0.1.0"
