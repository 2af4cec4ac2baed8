"""Model sources (hub, local directory, GGUF), the on-disk cache, the registry of served models."""
