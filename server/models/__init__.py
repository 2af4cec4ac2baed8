"""Model files: sources (hub, local directory, GGUF), the on-disk cache, GGUF conversion, the embedded defaults."""
