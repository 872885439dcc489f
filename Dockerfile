# mcdrop service, CPU only. The install steps are the Makefile's (make serve), so the tests
# exercise them: CPU torch pinned first, then the package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MCDROP_HOST=0.0.0.0 \
    MCDROP_PORT=8000 \
    MCDROP_MODEL_DIR=/app/models

RUN useradd --create-home --uid 10001 mcdrop
WORKDIR /app

# The CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY deploy/client ./deploy/client
COPY mcdrop ./mcdrop
COPY service ./service
# mcdrop depends on mcdrop-client (the client and the HTTP contract), built from deploy/client.
RUN pip install ./deploy/client .

COPY models ./models
USER mcdrop

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"

# One uvicorn worker: models are loaded once; small model work runs on its event loop, larger
# work in a pool of MCDROP_MAX_CONCURRENCY worker threads, with concurrent requests batched.
CMD ["mcdrop", "serve"]
