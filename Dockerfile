# syntax=docker/dockerfile:1
# meltguard in a container. docs/operations.md has the whole story; in short:
#   docker build -t meltguard .
#   docker run --rm -p 8000:8000 meltguard meltguard serve --model sim   # no GPU needed
#   docker run --rm --gpus all -p 8000:8000 \
#     -v /srv/meltguard/policy.yaml:/etc/meltguard/policy.yaml:ro -v /srv/models:/models:ro \
#     -e MELTGUARD_POLICY=/etc/meltguard/policy.yaml -e MELTGUARD_MODEL=/models/sd15 meltguard
# The power lever (the policy's `power` section) needs root or CAP_SYS_ADMIN, which this image's
# unprivileged user does not have (and Docker's root lacks CAP_SYS_ADMIN by default): to use it,
#   docker run --gpus all --user 0 --cap-add SYS_ADMIN ... meltguard
# Without it meltguard logs once that the card refused, and sheds load with admission alone.
# torch comes from PyPI unless TORCH_INDEX_URL names another wheel index (PyTorch publishes
# CPU-only and per-CUDA indexes): --build-arg TORCH_INDEX_URL=<index URL>.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/meltguard/venv
ENV PATH=/opt/meltguard/venv/bin:$PATH
# torch first and alone: the largest layer, and the one whose index may differ.
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi
COPY pyproject.toml README.md /src/
COPY meltguard /src/meltguard
RUN pip install /src && meltguard --version

FROM ${PYTHON_IMAGE}
# An unprivileged, fixed uid so mounted state and model directories can be chowned to it.
RUN useradd --system --uid 10001 --home-dir /var/lib/meltguard --create-home meltguard \
 && install -d -o meltguard -g meltguard -m 0700 /var/cache/meltguard /etc/meltguard
COPY --from=build /opt/meltguard/venv /opt/meltguard/venv
# The container's port is published, so listen on all its interfaces; admin routes still
# answer loopback peers only (docker exec), unless MELTGUARD_ADMIN_REMOTE=1.
# `docker stop` waits 10 s before SIGKILL: drain for less, or raise both together
# (docker run --stop-timeout 40 -e MELTGUARD_DRAIN_TIMEOUT=30).
ENV PATH=/opt/meltguard/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MELTGUARD_HOST=0.0.0.0 \
    MELTGUARD_PORT=8000 \
    MELTGUARD_LOG_FORMAT=json \
    MELTGUARD_STORE=sqlite:/var/lib/meltguard/quota.db \
    MELTGUARD_DRAIN_TIMEOUT=8 \
    HF_HOME=/var/cache/meltguard/huggingface
USER meltguard
WORKDIR /var/lib/meltguard
VOLUME ["/var/lib/meltguard"]
EXPOSE 8000
# SIGTERM drains: new requests get 503 with Retry-After, in-flight generations finish.
STOPSIGNAL SIGTERM
# /healthz answers while the process runs; the slim image has no curl, so Python asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MELTGUARD_PORT', '8000'), timeout=2)"]
# Exec form: meltguard is PID 1 and gets SIGTERM and SIGHUP itself, not through a shell.
# No ENTRYPOINT, so `command: ["meltguard", "serve", ...]` (dashboards/docker-compose.yml)
# and `docker run IMAGE meltguard policy check FILE` work as written.
CMD ["meltguard", "serve"]
