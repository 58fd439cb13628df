# syntax=docker/dockerfile:1
# imgsim's Airflow image for the scale-out deployment (docker-compose.yaml, docs/scale-out.md).
#
# Every Airflow service (api-server, scheduler, dag-processor, triggerer, Celery workers, init)
# runs this image. It is the official slim Airflow image plus:
#   * a Java 17 JRE, because SparkSubmitOperator runs spark-submit in client mode: the Spark
#     driver runs inside the Celery worker and its executors on the Spark workers;
#   * requirements.lock (the versions the test suite runs with), torch from a CPU index by
#     default (build arg TORCH_INDEX_URL);
#   * the project at /opt/imgsim (installed editable, so imgsim.config.PROJECT_ROOT is
#     /opt/imgsim and spark_jobs/ sits beside dags/ as the DAGs expect);
#   * the ResNet-18 weights in $TORCH_HOME (build arg RESNET18_WEIGHTS_URL, or a file in
#     docker/weights/), because workers must not download anything at run time.
#
# Build (docker-compose builds it for you):
#   docker build -t imgsim-airflow:local .
#   docker build --build-arg TORCH_INDEX_URL= -t imgsim-airflow:local .     # exactly the lock (CUDA 13 torch)
#   docker build --build-arg RESNET18_WEIGHTS_URL= -t imgsim-airflow:local . # no ResNet-18 weights

ARG AIRFLOW_VERSION=3.3.2
# Must equal the Python that runs the Spark executors (docker/spark.Dockerfile): PySpark refuses
# a driver and workers with different minor versions.
ARG PYTHON_VERSION=3.11
# Java 17, the same major version as the Spark image (eclipse-temurin:17 based).
ARG JAVA_IMAGE=eclipse-temurin:17-jre

FROM ${JAVA_IMAGE} AS java

FROM apache/airflow:slim-${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG PYTHON_VERSION

USER root
COPY --from=java /opt/java/openjdk /opt/java/openjdk
ENV JAVA_HOME=/opt/java/openjdk \
    PATH=/opt/java/openjdk/bin:${PATH} \
    TORCH_HOME=/opt/imgsim-models/torch \
    IMGSIM_DATA_ROOT=/data/imgsim
# curl for the healthchecks. The directories are created here, owned by airflow:0 and group
# writable, so that fresh named volumes mounted on them start with that ownership.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /opt/imgsim /data/imgsim /opt/airflow/auth /opt/airflow/logs \
                "${TORCH_HOME}/hub/checkpoints" \
    && chown -R airflow:0 /opt/imgsim /data/imgsim /opt/airflow/auth /opt/airflow/logs \
                /opt/imgsim-models \
    && chmod -R g+rwX /opt/imgsim /data/imgsim /opt/airflow/auth /opt/airflow/logs \
                /opt/imgsim-models
COPY docker/bake_weights.sh /usr/local/bin/imgsim-bake-weights
COPY docker/airflow-init.sh /usr/local/bin/imgsim-airflow-init
RUN chmod 0755 /usr/local/bin/imgsim-bake-weights /usr/local/bin/imgsim-airflow-init

USER airflow

# Dependencies first (the slow, rarely changing layer). requirements.lock was frozen on a
# machine whose local index carries torch 2.14.1 as a CUDA 13 build (+ nvidia-* / cuda-* /
# triton wheels, about 5.5 GB). By default the image takes torch/torchvision 2.14.1/0.29.1
# from PyTorch's CPU index instead (same versions, "+cpu" local label, no CUDA wheels): the
# lock's "torch==2.14.1" pin matches "2.14.1+cpu" and pip prefers it. Set TORCH_INDEX_URL to
# an empty string to install the lock exactly as frozen (GPU workers), or to another index
# (e.g. https://download.pytorch.org/whl/cu130).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --chown=airflow:0 requirements.lock /tmp/requirements.lock
RUN set -eux; \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        grep -Ev '^(nvidia-|cuda-|triton==)' /tmp/requirements.lock > /tmp/requirements.txt; \
        pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt; \
    else \
        pip install --no-cache-dir -r /tmp/requirements.lock; \
    fi; \
    rm -f /tmp/requirements.lock /tmp/requirements.txt; \
    python -c "import sys; v = '%d.%d' % sys.version_info[:2]; assert v == '${PYTHON_VERSION}', v"; \
    command -v spark-submit

# ResNet-18 weights (torchvision's resnet18-f37072fd.pth, or the file RESNET18_WEIGHTS_URL
# names), checked as torchvision does against the sha256 prefix in the name.
# docker/weights/<name> is used when present (offline builds); otherwise RESNET18_WEIGHTS_URL is
# downloaded (a mirror may serve it); set it empty to bake nothing (then only
# IMGSIM_BACKBONE=efficientnet_lite0 works, whose weights come with its pip package).
ARG RESNET18_WEIGHTS_URL=https://download.pytorch.org/models/resnet18-f37072fd.pth
COPY --chown=airflow:0 docker/weights/ /tmp/weights/
RUN imgsim-bake-weights "${TORCH_HOME}/hub/checkpoints" "${RESNET18_WEIGHTS_URL}" /tmp/weights \
    && rm -rf /tmp/weights
# imgsim looks for the file the URL names (empty: it never downloads at run time).
ENV IMGSIM_RESNET18_WEIGHTS_URL=${RESNET18_WEIGHTS_URL}

# The project. README.md is needed by pyproject.toml (readme = ...).
COPY --chown=airflow:0 pyproject.toml README.md /opt/imgsim/
COPY --chown=airflow:0 include/ /opt/imgsim/include/
COPY --chown=airflow:0 dags/ /opt/imgsim/dags/
COPY --chown=airflow:0 plugins/ /opt/imgsim/plugins/
COPY --chown=airflow:0 spark_jobs/ /opt/imgsim/spark_jobs/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e /opt/imgsim \
    && python -c "import imgsim.config as c; assert str(c.PROJECT_ROOT) == '/opt/imgsim', c.PROJECT_ROOT"

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/imgsim/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/imgsim/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
