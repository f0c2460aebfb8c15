#!/bin/sh
# MLflow behind basic auth: the auth store in PostgreSQL, the admin from the environment
# (MLflow ships no default admin password), artifacts proxied to MinIO.
set -eu
# The user and password go into the URLs percent-encoded: a password with @ : / # ? or %
# would otherwise change where the URL points, or fail to parse.
quote() { python -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
PG="postgresql://$(quote "$POSTGRES_USER"):$(quote "$POSTGRES_PASSWORD")@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}"
# The .ini holds the database password: an owner-only folder. configparser reads "%" as
# interpolation, so the encoded URL's "%" is doubled there.
INI_DIR=$(mktemp -d)
cat > "$INI_DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = $(printf '%s' "$PG/mlflow_auth" | sed 's/%/%%/g')
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$INI_DIR/basic_auth.ini"
exec mlflow server --app-name basic-auth \
  --backend-store-uri "$PG/mlflow" \
  --artifacts-destination s3://mlflow --host 0.0.0.0 --port 5000
