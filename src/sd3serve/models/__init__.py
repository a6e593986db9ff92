"""Models that ship with sd3serve: the embedded default model and the builders behind it."""
