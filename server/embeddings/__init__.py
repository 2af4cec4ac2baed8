"""Sentence-embedding models: an MLX BERT-family encoder plus sentence-transformers pooling."""
