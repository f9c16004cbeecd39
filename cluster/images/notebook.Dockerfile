# syntax=docker/dockerfile:1.7
#
# mochi_lab single-user notebook image for JupyterHub (z2jh `singleuser.image`).
# Jupyter docker-stacks base + the thin client with its notebook extra (mochi_lab[notebook]: widgets,
# pandas, thumbnails) installed from this repository's pyproject, and the example notebooks. No torch,
# Ray or diffusers: a notebook talks HTTP to the gateway (MOCHI_LAB_GATEWAY), which runs jobs on the pool.
#
# Build context is the repository root:
#   docker build -f cluster/images/notebook.Dockerfile -t ghcr.io/mochi-lab/mochi-lab-notebook:0.1.0 .
ARG NOTEBOOK_BASE_IMAGE=quay.io/jupyter/base-notebook:python-3.11
FROM ${NOTEBOOK_BASE_IMAGE}
ARG PYTHON_VERSION=3.11
ARG MOCHI_EXTRAS=notebook

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MOCHI_LAB_DATA_DIR=/data/mochi_lab

RUN python -c "import sys; want='${PYTHON_VERSION}'; got='%d.%d' % sys.version_info[:2]; assert got == want, (got, want)"

# docker-stacks images: NB_UID=1000, NB_GID=100, and the conda env is owned by NB_UID.
COPY --chown=1000:100 . /tmp/mochi_lab_src
# The thin client: the build fails if an extra brought in what only workers and the gateway run.
RUN pip install "/tmp/mochi_lab_src[${MOCHI_EXTRAS}]" \
 && python -c "import importlib.util as u, mochi_lab.client.http, mochi_lab.display.widgets; \
heavy = [m for m in ('torch', 'diffusers', 'transformers', 'ray', 'fastapi', 'uvicorn') if u.find_spec(m)]; \
assert not heavy, heavy" \
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
