"""Runs in vLLM's API server process: the HTTP routes, the trainer's supervisor, and the
live readout's collector. Nothing here touches model weights."""
