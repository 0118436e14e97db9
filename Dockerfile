# ich-node: the DICOM node (docs/deployment.md, "Install with Docker").
#
#   docker build -t ich-node .
#   docker run -d --name ich-node --restart unless-stopped --stop-timeout 60 --gpus all \
#     -p 11112:11112 -v ich-spool:/var/lib/ich-node -v /srv/ich-node:/etc/ich-node:ro ich-node
#
# /etc/ich-node holds node.yaml and the model bundle (model.bundle:
# /etc/ich-node/model.safetensors, storage.dir: /var/lib/ich-node). GPU: the
# PyTorch wheels bundle CUDA; the host needs the NVIDIA driver and the NVIDIA
# Container Toolkit (`--gpus all`). Without a GPU, leave `--gpus` out.
#
# Behind a hospital proxy or without Docker Hub: BASE_IMAGE names another Debian 12
# image with Python 3.11 and pip (docs/deployment.md shows how to make one with
# debootstrap), and pip's own variables point at a mirror, for example
#   docker build --build-arg BASE_IMAGE=registry.local/python:3.11-slim \
#     --build-arg PIP_INDEX_URL=https://mirror.local/simple .
# Build arguments are not kept in the image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST

LABEL org.opencontainers.image.title="ich-node" \
      org.opencontainers.image.description="AI DICOM node that flags intracranial hemorrhage on head CT (triage support, not a diagnosis)" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini: PID 1 that forwards SIGTERM to the node and reaps its worker processes.
# dcmtk: echoscu/storescu for troubleshooting from inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini dcmtk \
    && rm -rf /var/lib/apt/lists/*

# NVIDIA_*: read by the NVIDIA container runtime, which then exposes the GPUs for compute.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# An unprivileged user owns the state; the code stays root-owned (read-only to it).
RUN groupadd --system --gid 10001 ich \
    && useradd --system --uid 10001 --gid ich --home-dir /var/lib/ich-node \
       --shell /usr/sbin/nologin ich

WORKDIR /opt/ich-node
COPY pyproject.toml README.md ./
COPY ich_node ./ich_node
COPY training ./training
COPY config ./config
COPY docs ./docs
RUN pip install . \
    && install -d -o ich -g ich -m 0700 /var/lib/ich-node \
    && install -d -m 0755 /etc/ich-node

USER ich:ich
VOLUME ["/var/lib/ich-node"]
EXPOSE 11112
STOPSIGNAL SIGTERM
# Healthy when the listener answers C-ECHO and the workers beat (ich-node health).
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["ich-node", "health", "--config", "/etc/ich-node/node.yaml"]
ENTRYPOINT ["tini", "--", "ich-node"]
CMD ["serve", "--config", "/etc/ich-node/node.yaml"]
