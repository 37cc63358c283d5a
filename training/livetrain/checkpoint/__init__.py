"""The model's safetensors files: read (trainer, API server), synced from live weights
(trainer), and recovered after an interrupted sync (any vLLM process, before loading)."""
