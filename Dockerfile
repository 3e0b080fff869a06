# The one K2 image: `k2 operator`, `k2 ingest …`, `k2 stream run`, `k2 api`, `k2 maintain` all run
# from it (the Kubernetes manifests choose the command). `build` resolves wheels into a virtualenv;
# `runtime` (the default, last stage) copies only that virtualenv onto a clean slim base; `dev`
# (Tilt's target) is the same image with K2's own packages writable for live updates.
#
# Runtime contract (what the Helm chart relies on):
#   * runs as UID/GID 10001, never root; no capabilities needed
#   * works with readOnlyRootFilesystem: only /tmp (emptyDir) and /var/lib/k2 (workdir, emptyDir)
#     are written; pip byte-compiles everything at install time, caches point under /tmp
#   * no HEALTHCHECK: Kubernetes probes decide liveness/readiness
#   * tini as PID 1, so SIGTERM reaches `k2` and zombies are reaped
#
# Any builder builds it (BuildKit or the legacy one of Debian's docker.io, which has no buildx),
# offline from image registries too: no `# syntax=` frontend to pull, no BuildKit-only mounts.
# PYTHON_IMAGE may be the upstream slim image or the Debian bookworm base that k2.stack.images
# builds where no registry is reachable (`python -m k2.stack.images build k2`).

ARG PYTHON_IMAGE=python:3.11.15-slim-trixie

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/k2
ENV PATH=/opt/k2/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so editing Python sources does not re-resolve
# them: install the project with empty packages, then drop the project and keep its dependencies.
COPY pyproject.toml README.md ./
RUN mkdir -p workloads/k2 operator/k2_operator data/k2_synthetic \
 && touch workloads/k2/__init__.py operator/k2_operator/__init__.py data/k2_synthetic/__init__.py \
 && pip install --no-cache-dir . \
 && pip uninstall --yes k2 \
 && rm -rf workloads operator data

# The `k2` distribution itself (packages workloads/k2, operator/k2_operator, data/k2_synthetic).
COPY workloads/k2 workloads/k2
COPY operator/k2_operator operator/k2_operator
COPY data/k2_synthetic data/k2_synthetic
# Without extras: the runtime set only. The local dev stack (`k2.stack`, `k2[stack]`) stays out.
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf /opt/k2/lib/python3.*/site-packages/k2/stack \
 && k2 --help >/dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base

ARG K2_UID=10001
# tini: a real PID 1 (signal forwarding, zombie reaping). Nothing else beyond the slim base.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid ${K2_UID} k2 \
 && useradd --uid ${K2_UID} --gid ${K2_UID} --no-create-home --home-dir /tmp --shell /usr/sbin/nologin k2 \
 && install -d -o ${K2_UID} -g ${K2_UID} -m 0750 /var/lib/k2

COPY --from=build /opt/k2 /opt/k2

ENV PATH=/opt/k2/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

LABEL org.opencontainers.image.title="k2" \
      org.opencontainers.image.description="K2 market-data lakehouse: operator and workloads" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/k2-lakehouse/k2"

# Relative K2 defaults (.k2/…) land here; the chart mounts an emptyDir over it.
WORKDIR /var/lib/k2
USER ${K2_UID}:${K2_UID}
EXPOSE 8000 9090
ENTRYPOINT ["/usr/bin/tini", "--", "k2"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# Tilt's live_update syncs Python sources into the running container as its user.
FROM runtime-base AS dev
ARG K2_UID=10001
USER root
RUN cd /opt/k2/lib/python3.11/site-packages && chown -R ${K2_UID}:${K2_UID} k2 k2_operator k2_synthetic
USER ${K2_UID}:${K2_UID}

# ---------------------------------------------------------------------------------------------
FROM runtime-base AS runtime
