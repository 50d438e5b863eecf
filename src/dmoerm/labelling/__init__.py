"""Capability labels for phase 2: LLM judges (API or local), human per-aspect annotations, their schema."""
