"""msgspec Structs for the OpenAI wire formats, and the one way request bodies are decoded."""
