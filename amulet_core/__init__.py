"""Amulet Serve core: decoding methods, preference prompts, model loading and the engine."""
