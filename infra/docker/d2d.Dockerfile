# d2d with its pinned set: the image for the Prefect worker, the Ray nodes and MLflow,
# so every process runs the same versions (Ray requires that across a cluster).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/d2d
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
# constraints.txt pins the CPU build of torch (+cpu); a GPU image pins a CUDA build instead
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir -c constraints.txt -e . "mlflow[auth]" psycopg2-binary boto3
