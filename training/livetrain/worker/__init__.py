"""Runs in vLLM's worker process (the one that holds the model): weight export and the
live readout's per-step scoring."""
