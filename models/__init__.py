"""Robust networks, checkpoints, the perturbation engine, Grad-CAM and ARA."""
