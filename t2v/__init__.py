"""t2v: a from-scratch PyTorch reimplementation of the ModelScope text-to-video model."""

__version__ = "0.1.0"
