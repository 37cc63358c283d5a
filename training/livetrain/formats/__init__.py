"""What crosses a process boundary, defined once and imported by both ends: the typed
messages, the zero-copy tensor handles, the score ring, and the readout file format."""
