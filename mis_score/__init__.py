"""`mis-score`: the command line. Offline scoring and demo checkpoints (no Ray), the engine
benchmark and the deployment validator. The top layer: it may import every package it wires
together; no package imports it."""
