"""Persistence: the server's one database (embedded SQLite, or a shared PostgreSQL) and the stores built on it.

`database` owns the interface, versioned migrations and SQLite; `postgres` the
same interface on PostgreSQL for replicas; `files` keeps uploaded files (bytes
under --data-dir, metadata rows); `responses` keeps the Responses API's stored
responses. Fine-tuning jobs declare their own tables in `server.finetune.jobs`,
on the same `Database`.
"""
