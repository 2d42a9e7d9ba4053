"""aex: adversarial explanations and Grad-CAM for robust image classifiers.

The top layer: the command line (``aex.cli``), the HTTP client (``aex.client``) and the
``aex serve`` composition root (``aex.serve``)."""

from models.version import __version__

__all__ = ["__version__"]
