"""PyTorch -> ONNX graphs and the bundle manifest."""
