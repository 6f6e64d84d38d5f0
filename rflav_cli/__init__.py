"""rflav: generate, train and evaluate R-FLAV rolling audio-video models."""

__version__ = "0.1.0"
