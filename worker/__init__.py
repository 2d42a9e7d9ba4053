"""RQ workers: load checkpoints once, run classify and explain jobs."""
