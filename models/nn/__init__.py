"""Networks: the half-Huber ReLU, pre-activation ResNets, the registry of architectures and where a model runs."""
