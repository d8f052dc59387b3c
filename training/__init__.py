"""Training of a tiny Qwen2VL-Flux on generated scenes (issue 8); `scenes` makes the data."""
