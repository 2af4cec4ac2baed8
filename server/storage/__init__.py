"""Persistence: the SQLite database shared by files, fine-tuning jobs and stored responses."""
