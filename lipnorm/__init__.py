"""lipnorm: measure and control the capacity of deep networks through normalization."""
__version__ = "0.1.0"
