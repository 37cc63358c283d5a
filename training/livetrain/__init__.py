"""livetrain: train a vLLM-served model in place while it serves."""

__version__ = "0.1.0"
