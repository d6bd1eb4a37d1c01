# syntax=docker/dockerfile:1.7
# The Ray image: the RayService (Ray Serve API) and the controller's RayJobs (training, scoring),
# built on the Ray image of the Ray version streamrec uses (2.60.0, Python 3.11, CPU). For GPU
# workers use RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu and a CUDA build of torch 2.13.0.
#
#   docker build -f docker/ray.Dockerfile -t streamrec/ray:<tag> .      (skaffold.yaml does this)
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/tmp/src/docker/constraints.txt

# The base image's user is ray (uid 1000, group users 100) with its Python in /home/ray/anaconda3.
COPY --chown=1000:100 pyproject.toml README.md /tmp/src/
COPY --chown=1000:100 docker/constraints.txt /tmp/src/docker/constraints.txt
COPY --chown=1000:100 streamrec /tmp/src/streamrec
COPY --chown=1000:100 ingest /tmp/src/ingest
COPY --chown=1000:100 spark_etl /tmp/src/spark_etl
COPY --chown=1000:100 ray_apps /tmp/src/ray_apps
COPY --chown=1000:100 operators /tmp/src/operators
# torch first, from the CPU index, so nothing pulls a multi-GB CUDA build; then streamrec with the
# Ray extra, every version held by the constraints (ray==2.60.0 matches the base image).
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install "/tmp/src[ray]" \
    && python -c "import ray, torch, ray_apps.serve.schemas; assert ray.__version__ == '2.60.0', ray.__version__" \
    && rm -rf /tmp/src

# The code version recorded in every model version's manifest (ray_apps.registry.code_version): the
# build context carries no .git, so skaffold passes the commit (empty: the package version is used).
ARG STREAMREC_CODE_VERSION=""
ENV PYTHONUNBUFFERED=1 \
    STREAMREC_CONFIG=/etc/streamrec/streamrec.yaml \
    STREAMREC_CODE_VERSION=${STREAMREC_CODE_VERSION}
USER 1000:100
WORKDIR /home/ray
