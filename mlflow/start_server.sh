#!/usr/bin/env bash
# Start the team's MLflow tracking server and model registry.
#
#   mlflow/start_server.sh            # settings from mlflow/server.env (see server.env.example)
#   MLFLOW_PORT=5001 mlflow/start_server.sh
#
# Backend store: SQLite by default (one machine), PostgreSQL for a team
# (MLFLOW_BACKEND_STORE_URI=postgresql://...). Artefacts: a local folder by default, S3 for a team
# (MLFLOW_ARTIFACTS_DESTINATION=s3://...); the server proxies them (--serve-artifacts), so clients
# need only the tracking URI, never the bucket's credentials. Telemetry is off.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
env_file="${MLFLOW_SERVER_ENV:-$here/server.env}"
if [[ -f "$env_file" ]]; then
  set -a; source "$env_file"; set +a
fi

data="${BLIP_OPS_DATA:-$root/data}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$data/mlflow/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$data/mlflow/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-localhost,127.0.0.1,$host,localhost:$port,127.0.0.1:$port,$host:$port}"

export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
if [[ "$backend" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
fi

mlflow_bin="${MLFLOW_BIN:-$(command -v mlflow || echo "$root/.venv/bin/mlflow")}"
shown_backend="$(sed -E 's#(://[^:/@]+:)[^@]*@#\1***@#' <<<"$backend")"
echo "MLflow server on http://$host:$port  backend=$shown_backend  artifacts=$artifacts" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  --serve-artifacts --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "$workers" \
  --allowed-hosts "$allowed_hosts"
