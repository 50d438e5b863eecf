"""dmoerm: double-layer mixture-of-experts reward models (DMoERM, Quan 2024, arXiv 2403.01197)."""

__version__ = "0.1.0"
