# The modelfleet agent, from the same wheels as the control plane (see control-plane.Dockerfile).
# On first start it enrolls with MODELFLEET_SERVER and MODELFLEET_ENROLL_TOKEN (name and labels
# from MODELFLEET_AGENT_NAME and MODELFLEET_AGENT_LABELS); later starts find the identity in its
# state volume and only run. Run it with a read-only root filesystem: it writes only to
# /var/lib/modelfleet-agent and /tmp.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PYTHON=python3
COPY deps /wheels/deps
RUN ${PYTHON} -m venv /opt/modelfleet \
    && /opt/modelfleet/bin/pip install --no-cache-dir --no-index --find-links /wheels/deps \
       /wheels/deps/*.whl \
    && rm -rf /wheels/deps
COPY app /wheels/app
COPY agent-entrypoint.sh /usr/local/bin/modelfleet-agent-entrypoint
RUN /opt/modelfleet/bin/pip install --no-cache-dir --no-index --no-deps /wheels/app/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10002 --home-dir /var/lib/modelfleet-agent \
       --shell /usr/sbin/nologin modelfleet-agent \
    && mkdir -p /var/lib/modelfleet-agent && chown modelfleet-agent /var/lib/modelfleet-agent
ENV PATH=/opt/modelfleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    MODELFLEET_AGENT_STATE_DIR=/var/lib/modelfleet-agent
USER 10002
VOLUME /var/lib/modelfleet-agent
EXPOSE 8510
# Live, not ready: an agent with no model yet is healthy, only not serving.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8510/v2/health/live', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/modelfleet-agent-entrypoint"]
CMD []
