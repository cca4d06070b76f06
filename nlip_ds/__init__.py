"""nlip-ds: noise-robust language-image pre-training (NLIP) on DeepSpeed."""

__version__ = "0.1.0"
