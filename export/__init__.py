"""Model export and weight preparation (`python -m export`, run by `make models`)."""
