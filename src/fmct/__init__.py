"""fmct: a self-supervised 3D foundation model for head CT."""

__version__ = "0.1.0"
