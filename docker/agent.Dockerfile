# dpfed site agent: dials out to the orchestrator (no port is opened); data and ledger are volumes.
# Build from the repository root:  docker build -f docker/agent.Dockerfile -t dpfed-agent .
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MALLOC_ARENA_MAX=2
WORKDIR /opt/dpfed
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY requirements-runtime.lock pyproject.toml README.md ./
RUN grep -v '^torch==' requirements-runtime.lock > /tmp/req.txt && pip install -r /tmp/req.txt
COPY protos ./protos
COPY common ./common
COPY orchestrator ./orchestrator
COPY site_agent ./site_agent
RUN pip install --no-deps . && useradd --create-home --uid 10001 dpfed \
    && mkdir -p /site/state && chown -R dpfed /site
USER dpfed
# /site/site.yaml (the site's config and policy), /site/data (read-only), /site/state (ledger),
# /site/pki (this site's certificate, key and the CA certificate).
VOLUME ["/site/state"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import sys, site_agent.config as c; c.load_site_config('/site/site.yaml'); sys.exit(0)" || exit 1
ENTRYPOINT ["site-agent"]
CMD ["serve", "--config", "/site/site.yaml"]
