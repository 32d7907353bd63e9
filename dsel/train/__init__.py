"""Training: the torch backend (CPU or one GPU) and the megatron-core backend (TP/PP/DP)."""
