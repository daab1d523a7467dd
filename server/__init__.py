"""Amulet Serve's HTTP layer: OpenAI-compatible API over an engine client."""
