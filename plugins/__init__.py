"""The fused spatially-adaptive MLP: Triton kernel, ahead-of-time compile, TensorRT plugin."""
