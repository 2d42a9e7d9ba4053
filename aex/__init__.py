"""aex: adversarial explanations and Grad-CAM for robust image classifiers."""

__version__ = "0.1.0"
