"""Prompt and demonstration sources, splits and the packaged benchmark provenance."""
