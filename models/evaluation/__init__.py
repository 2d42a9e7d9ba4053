"""Figures of a checkpoint on a data set: accuracy (one function) and the evaluate command's report."""
