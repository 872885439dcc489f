# mcdrop service, CPU only: `mcdrop serve` on the bundled models, as a non-root user.
#
#   docker build -t mcdrop .          # or podman build --format docker (OCI drops HEALTHCHECK)
#   docker run -p 127.0.0.1:8000:8000 mcdrop
#
# Both build arguments default to the public images and indexes; `make image` passes local
# stand-ins where the machine has no registry (see the README, "Containers and clusters").
ARG BASE_IMAGE=python:3.11-slim

# Build stage: a virtual environment with CPU torch and the package, copied whole into the
# runtime stage, so neither the sources nor pip's leftovers reach the image.
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mcdrop
# The CPU wheel of torch first, as `make install` does: an unpinned torch would pull a multi-GB
# CUDA build. Its C++ headers and C++ test binaries (about 145 MB) only serve extension builds.
RUN /opt/mcdrop/bin/pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && rm -rf /opt/mcdrop/lib/python3.11/site-packages/torch/include \
              /opt/mcdrop/lib/python3.11/site-packages/torch/test
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/client ./deploy/client
COPY mcdrop ./mcdrop
COPY service ./service
# Not editable, no dev extra: the runtime needs only the installed packages. mcdrop depends on
# mcdrop-client (the client and the HTTP contract), built from deploy/client.
RUN /opt/mcdrop/bin/pip install ./deploy/client .
# numba's compiled mask loops (mcdrop.cpu_masks), cached in the image: a container loads them in
# milliseconds instead of compiling them (seconds) at its first start.
# From /, not /src: the installed package's loops, whose path keys numba's cache.
ENV NUMBA_CACHE_DIR=/opt/mcdrop/numba-cache
RUN cd / && /opt/mcdrop/bin/python -c "from mcdrop import cpu_masks; cpu_masks.warm_up()"

FROM ${BASE_IMAGE}
ENV PATH=/opt/mcdrop/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MCDROP_HOST=0.0.0.0 \
    MCDROP_PORT=8000 \
    MCDROP_MODEL_DIR=/app/models
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --create-home --uid 10001 --user-group mcdrop
COPY --from=build /opt/mcdrop /opt/mcdrop
# Writable by the service's user: numba picks a cache directory it can write to (else it compiles
# anew), and a CPU other than the build machine's adds its own entries.
ENV NUMBA_CACHE_DIR=/opt/mcdrop/numba-cache
RUN chown -R 10001:10001 /opt/mcdrop/numba-cache
WORKDIR /app
COPY models ./models
USER 10001:10001

EXPOSE 8000
# Python, not curl (slim images have none), on whatever port MCDROP_PORT says; 503 (loading or
# no model loaded) and a refused connection both fail it. /ready is 200 for "degraded" too, so
# one broken model does not fail the container when MCDROP_EXIT_ON_ERROR=false.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; port = os.environ.get('MCDROP_PORT', '8000'); sys.exit(r.urlopen(f'http://127.0.0.1:{port}/ready', timeout=4).status != 200)"]

# One uvicorn worker: models are loaded once; small model work runs on its event loop, larger
# work in a pool of MCDROP_MAX_CONCURRENCY worker threads, with concurrent requests batched.
# More cores: more containers (or replicas, see deploy/), not more workers.
CMD ["mcdrop", "serve"]
