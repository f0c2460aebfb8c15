# d2d with its pinned set: the image for the Prefect worker, the Ray nodes and MLflow,
# so every process runs the same versions (Ray requires that across a cluster).
# An exact tag (the Python of constraints.txt's set); add @sha256:<digest> from your registry.
FROM python:3.11.7-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/d2d
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
COPY app ./app
# constraints.txt pins the CPU build of torch (+cpu); a GPU image pins a CUDA build instead
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# psycopg2: the MLflow server's PostgreSQL driver (SQLAlchemy's default for postgresql://); boto3: S3/MinIO
RUN pip install --no-cache-dir -c constraints.txt -e . "mlflow[auth]" psycopg2-binary==2.9.13 boto3==1.44.8
# Everything runs as an unprivileged user: the Prefect worker holds the team's credentials,
# and a flow's code must not own the container.
RUN useradd --create-home --uid 1000 --user-group d2d
USER 1000:1000
ENV HOME=/home/d2d
