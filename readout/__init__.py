"""Offline concept-readout tools: the story corpus and concept-direction extraction."""
