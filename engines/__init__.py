"""Inference backends behind one Engine interface, and benchmarking."""
