"""The one perturbation search and what is measured with it: ARA and the stability score."""
