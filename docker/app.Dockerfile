# syntax=docker/dockerfile:1.7
# The slim streamrec image: the Kinesis consumer, the PipelineRun controller, the CronJob that creates
# the day's PipelineRun, and the chart's helm test. No Ray, no Spark, no torch.
#
#   docker build -f docker/app.Dockerfile -t streamrec/app:<tag> .      (skaffold.yaml does this)
#
# Versions are pinned: the base image by tag (add @sha256:<digest> in your registry mirror), the
# Python packages by docker/constraints.txt (what the tests ran with).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/docker/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints.txt docker/constraints.txt
COPY streamrec streamrec
COPY ingest ingest
COPY spark_etl spark_etl
COPY ray_apps ray_apps
COPY operators operators
RUN python -m venv /opt/streamrec \
    && /opt/streamrec/bin/pip install ".[operators]" \
    && /opt/streamrec/bin/streamrec --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 streamrec \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin streamrec
COPY --from=build /opt/streamrec /opt/streamrec
ENV PATH=/opt/streamrec/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STREAMREC_CONFIG=/etc/streamrec/streamrec.yaml
# Non-root, numeric (Kubernetes runAsNonRoot can verify it); the chart sets the same ids.
USER 10001:10001
CMD ["streamrec", "--help"]
