# racm3 services: one image, every role (`serve --role embedded|gateway|retriever|generator`)
# and the index builder. Same install steps as the Makefile.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Pin the torch/torchvision pair first: a plain "torch" may resolve to another build.
# Its own layer, so code changes do not reinstall torch.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README* ./
# The layers, lowest first (docs/architecture.md)
COPY model ./model
COPY retrieval ./retrieval
COPY app ./app
COPY world ./world
COPY evaluation ./evaluation
COPY training ./training
COPY benchmarks ./benchmarks
COPY racm3 ./racm3
# Checked from / so that the installed package is imported, not the sources in /app.
RUN pip install . && cd / && python -c "import app.serve, racm3.cli"

COPY docker/entrypoint.sh docker/healthcheck.py /docker/
RUN chmod 0755 /docker/entrypoint.sh \
    && useradd --create-home --uid 10001 racm3 \
    && mkdir -p /data/memory /app/bundles \
    && chown -R racm3 /data

# Bundles and memories are mounted (see docker-compose.yml), never baked in.
ENV RACM3_BUNDLE_DIR=/app/bundles/demo \
    RACM3_MEMORY_DIR=/data/memory \
    RACM3_HEALTH_PORT=8000

USER racm3
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "/docker/healthcheck.py"]
ENTRYPOINT ["/docker/entrypoint.sh"]
CMD ["serve", "--role", "embedded", "--host", "0.0.0.0", "--port", "8000"]
