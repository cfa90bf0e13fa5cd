"""Benchmarks: SiT vs PPF-2 vs PPF-3 sampling (`bench.sample`) and training (`bench.train`)."""
