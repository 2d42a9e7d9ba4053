"""The worker runtime: the process and its supervisor (pool), dynamic batches, and the computation of classify and explain jobs on the models loaded once."""
