# The modelfleet control plane, from the wheels in the build context (deploy/images/build-images.sh
# lays them out: deps/ for the dependencies, app/ for the checkout's own wheel), so building needs
# no package index. BASE is any Debian-like image with Python 3.11 and venv: the public
# python:3.11-slim, or modelfleet-base:bookworm from deploy/images/build-base.sh.
# Run it with a read-only root filesystem: it writes only to /var/lib/modelfleet and /tmp.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PYTHON=python3
COPY deps /wheels/deps
RUN ${PYTHON} -m venv /opt/modelfleet \
    && /opt/modelfleet/bin/pip install --no-cache-dir --no-index --find-links /wheels/deps \
       /wheels/deps/*.whl \
    && rm -rf /wheels/deps
COPY app /wheels/app
RUN /opt/modelfleet/bin/pip install --no-cache-dir --no-index --no-deps /wheels/app/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/modelfleet --shell /usr/sbin/nologin \
       modelfleet \
    && mkdir -p /var/lib/modelfleet /etc/modelfleet && chown modelfleet /var/lib/modelfleet
ENV PATH=/opt/modelfleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    MODELFLEET_HOST=0.0.0.0 \
    MODELFLEET_PORT=8400 \
    MODELFLEET_DATA_DIR=/var/lib/modelfleet
USER 10001
VOLUME /var/lib/modelfleet
EXPOSE 8400
# No curl in the image: Python asks /api/v1/health (liveness and a database round trip).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MODELFLEET_PORT', '8400') + '/api/v1/health', timeout=4)"]
CMD ["modelfleet", "server"]
