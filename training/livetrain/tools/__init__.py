"""Offline tooling outside vLLM: the command line, the server launcher and HTTP client,
the demo, and the built-in and tiny test models."""
