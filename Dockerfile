# mlx-dropin on Linux CPU: MLX's CPU backend with OpenBLAS, the default models baked in at build time.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenblas0-pthread \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install --no-cache-dir .

# Fetch and convert the embedded default models now, so the container starts offline.
ENV MLX_DROPIN_CACHE_DIR=/models
RUN mlx-dropin models pull smollm2-135m-instruct && mlx-dropin models pull all-minilm-l6-v2

ENV MLX_DROPIN_HOST=0.0.0.0 MLX_DROPIN_PORT=8000 MLX_DROPIN_OFFLINE=true
EXPOSE 8000
CMD ["mlx-dropin", "serve"]
