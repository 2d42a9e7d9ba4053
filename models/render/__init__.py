"""Pictures, made apart from the algorithms: colour maps, PNGs of explanations and plots."""
