# syntax=docker/dockerfile:1
# imgsim's Spark image: the Spark standalone master and workers of docker-compose.yaml.
#
# Based on the official Apache Spark image for the Spark version that requirements.lock pins
# for pyspark (4.2.0; Scala 2.13, Java 17 like the Airflow image's JRE). That image is Ubuntu
# 22.04, whose python3 is 3.10, while the Spark driver runs in the Airflow image (Python 3.11),
# and PySpark refuses executors whose Python minor version differs from the driver's
# ([PYTHON_VERSION_MISMATCH]). So this image adds Ubuntu's python3.11 (jammy universe) in a
# venv at /opt/imgsim-venv, first on PATH: both sides run "python3.11" (PYSPARK_PYTHON in
# docker-compose.yaml), with the same package versions (requirements.lock as constraints).
#
# Build (docker-compose builds it for you):
#   docker build -f docker/spark.Dockerfile -t imgsim-spark:local .

ARG SPARK_IMAGE=apache/spark:4.2.0-scala2.13-java17-python3-ubuntu
FROM ${SPARK_IMAGE}

ARG PYTHON_VERSION=3.11
# Ubuntu 22.04 ships python3.11 in "universe" (3.11.0). USE_DEADSNAKES=true takes a newer 3.11
# from the deadsnakes PPA instead (the minor version is what PySpark compares).
ARG USE_DEADSNAKES=false
USER root
RUN set -eux; \
    apt-get update; \
    if [ "${USE_DEADSNAKES}" = true ]; then \
        apt-get install -y --no-install-recommends software-properties-common; \
        add-apt-repository -y ppa:deadsnakes/ppa; \
        apt-get update; \
    fi; \
    apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv"; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    "python${PYTHON_VERSION}" -m venv /opt/imgsim-venv; \
    mkdir -p /opt/imgsim /data/imgsim /opt/imgsim-models/torch/hub/checkpoints \
             /opt/spark/work /opt/spark/logs /opt/spark/work-dir

ENV PATH=/opt/imgsim-venv/bin:${PATH} \
    TORCH_HOME=/opt/imgsim-models/torch \
    IMGSIM_DATA_ROOT=/data/imgsim \
    SPARK_WORKER_DIR=/opt/spark/work \
    SPARK_LOG_DIR=/opt/spark/logs \
    SPARK_NO_DAEMONIZE=true \
    HOME=/opt/spark/work-dir \
    MPLCONFIGDIR=/tmp/matplotlib

# Same torch choice as the Airflow image (see Dockerfile): CPU wheels by default.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements.lock docker/spark-requirements.txt /tmp/
RUN set -eux; \
    extra=""; \
    if [ -n "${TORCH_INDEX_URL}" ]; then extra="--extra-index-url ${TORCH_INDEX_URL}"; fi; \
    pip install --no-cache-dir ${extra} -c /tmp/requirements.lock -r /tmp/spark-requirements.txt; \
    rm -f /tmp/requirements.lock /tmp/spark-requirements.txt; \
    python3.11 -c "import numpy, pandas, pyarrow, torch, timm, PIL"

ARG RESNET18_WEIGHTS_URL=https://download.pytorch.org/models/resnet18-f37072fd.pth
COPY docker/bake_weights.sh /usr/local/bin/imgsim-bake-weights
COPY docker/weights/ /tmp/weights/
RUN chmod 0755 /usr/local/bin/imgsim-bake-weights \
    && imgsim-bake-weights "${TORCH_HOME}/hub/checkpoints" "${RESNET18_WEIGHTS_URL}" /tmp/weights \
    && rm -rf /tmp/weights
# imgsim looks for the file the URL names (empty: it never downloads at run time).
ENV IMGSIM_RESNET18_WEIGHTS_URL=${RESNET18_WEIGHTS_URL}

COPY pyproject.toml README.md /opt/imgsim/
COPY include/ /opt/imgsim/include/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e /opt/imgsim \
    && python3.11 -c "import imgsim.config"

# Every container of docker-compose.yaml runs as AIRFLOW_UID:0 (default 50000:0), so that the
# files the executors write on the shared data root belong to the same user as the ones the
# Airflow tasks and the Spark driver write. The official entrypoint gives such a uid a passwd
# entry (nss_wrapper); the directories it writes to are group 0 and group writable.
ARG IMGSIM_UID=50000
RUN chown -R "${IMGSIM_UID}:0" /data/imgsim /opt/spark/work /opt/spark/logs /opt/spark/work-dir \
    && chmod -R g+rwX /data/imgsim /opt/spark/work /opt/spark/logs /opt/spark/work-dir /opt/imgsim \
    && chmod 2775 /data/imgsim
USER ${IMGSIM_UID}:0
