"""The batch engine: block pool, paged KV cache, scheduler, sampling."""
