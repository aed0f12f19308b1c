# dpfed orchestrator: one gRPC port (mTLS), state in /state (SQLite, checkpoints, models, pki).
# Build from the repository root:  docker build -f docker/orchestrator.Dockerfile -t dpfed-orchestrator .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MALLOC_ARENA_MAX=2
WORKDIR /opt/dpfed
# CPU-only torch first, from PyTorch's CPU index: an unpinned torch would pull a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY requirements-runtime.lock pyproject.toml README.md ./
RUN grep -v '^torch==' requirements-runtime.lock > /tmp/req.txt && pip install -r /tmp/req.txt
COPY protos ./protos
COPY common ./common
COPY orchestrator ./orchestrator
COPY site_agent ./site_agent
RUN pip install --no-deps . && useradd --create-home --uid 10001 dpfed \
    && mkdir -p /state && chown dpfed /state
USER dpfed
VOLUME ["/state"]
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -m orchestrator.healthcheck --pki-dir /state/pki 127.0.0.1:50051 || exit 1
ENTRYPOINT ["orchestrator"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--state-dir", "/state", "--host", "orchestrator"]
