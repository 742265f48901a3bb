"""The use cases: infer (local and Ray), serve, loadtest, demo, doctor, scaled rendering, the
Triton model repository. They may import every layer; only cli.py imports them."""
