# syntax=docker/dockerfile:1.7
#
# mochi_lab single-user notebook image for JupyterHub (z2jh `singleuser.image`).
# Jupyter docker-stacks base + mochi_lab[notebook] (+ gpu by default, so the GPU profile can run
# torch on its own GPU) installed from this repository's pyproject, and the example notebooks.
# The Python minor version and the Ray version must equal the Ray image's: Ray Client refuses
# to connect otherwise.
#
# Build context is the repository root:
#   docker build -f cluster/images/notebook.Dockerfile -t ghcr.io/mochi-lab/mochi-lab-notebook:0.1.0 .
# A slim CPU-only image: --build-arg MOCHI_EXTRAS=notebook
ARG NOTEBOOK_BASE_IMAGE=quay.io/jupyter/base-notebook:python-3.11
FROM ${NOTEBOOK_BASE_IMAGE}
ARG PYTHON_VERSION=3.11
ARG RAY_VERSION=2.60.0
ARG MOCHI_EXTRAS=notebook,gpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MOCHI_LAB_DATA_DIR=/data/mochi_lab \
    RAY_USAGE_STATS_ENABLED=0

RUN python -c "import sys; want='${PYTHON_VERSION}'; got='%d.%d' % sys.version_info[:2]; assert got == want, (got, want)"

# docker-stacks images: NB_UID=1000, NB_GID=100, and the conda env is owned by NB_UID.
COPY --chown=1000:100 . /tmp/mochi_lab_src
RUN pip install "/tmp/mochi_lab_src[${MOCHI_EXTRAS}]" "ray[client]==${RAY_VERSION}" \
 && python -c "import ray, mochi_lab; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && mkdir -p /opt/mochi_lab \
 && cp -r /tmp/mochi_lab_src/notebooks /opt/mochi_lab/examples \
 && rm -rf /tmp/mochi_lab_src \
 && fix-permissions "${CONDA_DIR}" \
 && fix-permissions "/home/${NB_USER}"

LABEL org.opencontainers.image.title="mochi-lab-notebook" \
      org.opencontainers.image.description="JupyterHub single-user image with mochi_lab" \
      org.opencontainers.image.source="https://github.com/mochi-lab/mochi_lab"

USER ${NB_UID}
WORKDIR /home/${NB_USER}
