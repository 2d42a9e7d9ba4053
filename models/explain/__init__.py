"""Explanations: the targets grammar, adversarial explanations, Grad-CAM and the one pipeline for an image."""
