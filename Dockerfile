# syntax=docker/dockerfile:1
#
# unblock: the API, the worker and the migrations all run from this one image.
#   docker build -t unblock .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=... -e UNBLOCK_JWT_SECRET=... \
#       -e UNBLOCK_ENCRYPTION_KEY=... unblock                  # API + worker
#   docker run --rm --no-healthcheck ... unblock worker --metrics-port 9100  # worker only
#   docker run --rm --no-healthcheck ... unblock migrate      # schema to head
#
# The builder makes the project's wheel and installs it (with its Alembic scripts, which live in
# the app package) into a virtualenv; the final stage holds that virtualenv and no source tree.
# The Mosaic sandbox (sandbox/, its own distribution, for development) is not in the context.

# Both stages must use the same interpreter: the venv built in the first one is copied as is.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler only for dependencies without a wheel for the target platform; it stays here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes. The version
# ranges are the ones pyproject.toml declares.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself, as the wheel any other install would get (see .dockerignore).
COPY . .
RUN pip wheel --no-deps --wheel-dir /dist . \
    && pip install --no-deps /dist/unblock-*.whl \
    && python -m compileall -q /opt/venv/lib

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UNBLOCK_DATA_DIR=/data

# A fixed uid/gid so Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 unblock \
    && useradd --system --uid 10001 --gid unblock --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin unblock \
    && mkdir -p /data \
    && chown unblock:unblock /data

COPY --from=builder /opt/venv /opt/venv
WORKDIR /data

# Numeric, so runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8000

# No curl in the slim image: python itself asks /healthz (liveness, no database involved).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["unblock"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
