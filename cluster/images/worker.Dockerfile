# syntax=docker/dockerfile:1.7
#
# mochi_lab Ray image: the RayCluster head, the GPU workers, the model-prefetch Job and the gateway
# (`mochi-lab gateway`: Ray Client needs the cluster's Ray and Python) all run it.
# CUDA base + Python from uv + CUDA torch and mochi_lab[gpu,gateway] installed from this repository's
# pyproject, so the image carries exactly the package the lead ships (nothing pinned twice).
#
# Build context is the repository root:
#   docker build -f cluster/images/worker.Dockerfile -t ghcr.io/mochi-lab/mochi-lab-ray:0.1.0 .
# cluster/scripts/build-images.sh passes the build args below from cluster/images.env.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_BASE_IMAGE}
ARG PYTHON_VERSION=3.11
ARG RAY_VERSION=2.60.0
ARG MOCHI_EXTRAS=gpu,gateway

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HF_HOME=/models/huggingface \
    MOCHI_LAB_CACHE_DIR=/models/mochi_lab \
    MOCHI_LAB_DATA_DIR=/data/mochi_lab \
    RAY_USAGE_STATS_ENABLED=0

# bash and wget: KubeRay's readiness/liveness probes run `bash -c "wget ... | grep success"`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates wget tini \
 && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
 && python -c "import sys; want='${PYTHON_VERSION}'; got='%d.%d' % sys.version_info[:2]; assert got == want, (got, want)"

# The repository (see worker.Dockerfile.dockerignore for what is left out).
COPY . /src
# ray[default] brings the dashboard agent and the autoscaler that KubeRay's in-tree autoscaling runs;
# pinning it here makes a pyproject that disagrees with RayCluster.spec.rayVersion fail the build.
RUN pip install "/src[${MOCHI_EXTRAS}]" "ray[default]==${RAY_VERSION}" \
 && python -c "import ray, mochi_lab; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && rm -rf /src

# Ray's images run as uid 1000; so does this one. Ubuntu 24.04 ships a user 1000 called ubuntu.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray \
 && mkdir -p /models /data/mochi_lab \
 && chown ray:ray /models /data/mochi_lab

LABEL org.opencontainers.image.title="mochi-lab-ray" \
      org.opencontainers.image.description="Ray head/worker image for mochi_lab (Mochi 1 text-to-video on Ray)" \
      org.opencontainers.image.source="https://github.com/mochi-lab/mochi_lab"

USER 1000:1000
WORKDIR /home/ray
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["bash"]
