"""compactfusion: compressed residual communication for parallel diffusion inference."""

__version__ = "0.1.0"
