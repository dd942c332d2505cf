"""Evaluation library: pass-key retrieval grids and loss by position (the CLI is `evaluate`)."""
