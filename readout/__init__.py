"""Offline concept-readout tools: the story corpus and (later) direction extraction."""
