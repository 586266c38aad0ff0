# oauth-sidecar image.
#
#   docker build -t oauth-sidecar .
#   docker build --build-arg BASE_IMAGE=registry.example.com/python:3.11-slim -t oauth-sidecar .
#
# Built in two stages: the builder turns the project and its dependencies into wheels and installs
# them into a virtualenv; the final stage copies only that virtualenv onto a clean base, so no
# compiler, pip cache or source tree reaches the image. Both stages use the same base, so the
# virtualenv's interpreter path stays valid.
#
# At run time the root filesystem can be read-only: the only writable path the sidecar needs is
# /var/lib/sidecar (SQLite state; also HOME and TMPDIR), a volume. The config is expected at
# /etc/sidecar/config.toml (the Helm chart mounts it there).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
# WHEELHOUSE (optional): a directory, visible to the build, that holds a wheel of every dependency
# and of setuptools; pip then reads only it (--no-index) and the build needs no network, e.g.
#   podman build --network none -v "$PWD/wheels:/wheelhouse:ro" --build-arg WHEELHOUSE=/wheelhouse .
# (.ci/build-image does this). Unset: everything comes from PyPI.
ARG WHEELHOUSE=""
# Wheels for the project and every dependency (binary wheels where PyPI has them), then a
# virtualenv holding exactly those, without pip: nothing can be installed into it later. The
# virtualenv's own pip does the work, so a base whose python3 has no pip (Debian's) works too.
RUN python3 -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip wheel --no-cache-dir \
        ${WHEELHOUSE:+--no-index --find-links "$WHEELHOUSE"} --wheel-dir /wheels . \
    && /opt/sidecar/bin/pip install --no-cache-dir --no-index --no-deps /wheels/*.whl \
    && /opt/sidecar/bin/pip uninstall --yes pip setuptools \
    && /opt/sidecar/bin/sidecar --help > /dev/null

FROM ${BASE_IMAGE}
# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot and fsGroup can match it.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/sidecar \
    && chown 10001:10001 /var/lib/sidecar \
    && chmod 0750 /var/lib/sidecar
COPY --from=builder /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/sidecar \
    TMPDIR=/var/lib/sidecar
VOLUME ["/var/lib/sidecar"]
WORKDIR /var/lib/sidecar
USER 10001:10001
# The admin listener (/metrics, /healthz, /readyz) in the chart's config.
EXPOSE 9901
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/etc/sidecar/config.toml"]
