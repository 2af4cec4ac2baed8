"""Persistence: the server's one SQLite database and the stores built on it (uploaded files, stored responses).

`database` owns connections, schemas and transactions; `files` keeps uploaded
files (bytes under --data-dir, metadata rows); `responses` keeps the Responses
API's stored responses. Fine-tuning jobs declare their own table in
`server.finetune.jobs`, on the same `Database`.
"""
