"""Uploaded files (`/v1/files`): bytes on disk under --data-dir, metadata in SQLite, scoped per tenant."""
