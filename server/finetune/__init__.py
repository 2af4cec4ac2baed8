"""Fine-tuning: validate training files, train LoRA adapters in a worker process, persist jobs, serve results."""
