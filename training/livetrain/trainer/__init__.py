"""Runs in the training subprocess the API server starts (`python -m livetrain.trainer`):
the model views, the loss, APOLLO, and the optimizer state file."""
