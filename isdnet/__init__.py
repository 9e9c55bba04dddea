"""ISDNet: importance-guided semi-supervised adversarial segmentation of medical volumes."""

__version__ = "0.1.0"
