# ich-node: the DICOM node. Build: docker build -t ich-node .
# Run:  docker run --gpus all -p 11112:11112 -v ich-spool:/var/lib/ich-node \
#         -v $PWD/config:/etc/ich-node:ro -v $PWD/models:/models:ro ich-node
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --create-home --home-dir /home/ich --uid 10001 ich
WORKDIR /opt/ich-node
COPY pyproject.toml README.md ./
COPY ich_node ./ich_node
COPY training ./training
COPY config ./config
RUN pip install --no-cache-dir . \
    && mkdir -p /var/lib/ich-node /etc/ich-node \
    && chown ich:ich /var/lib/ich-node \
    && chmod 0700 /var/lib/ich-node

USER ich
VOLUME ["/var/lib/ich-node"]
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["ich-node", "health", "--config", "/etc/ich-node/node.yaml"]
ENTRYPOINT ["ich-node"]
CMD ["serve", "--config", "/etc/ich-node/node.yaml"]
