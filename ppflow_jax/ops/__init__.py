"""Low-level array ops the models call; `attention.py` owns the attention kernels and their dispatch."""
