#!/usr/bin/env bash
# One-shot initialisation of the scale-out deployment: the airflow-init service runs it as root
# before any other Airflow service starts (they wait for it to exit 0).
#
#  1. refuses to go on while .env still holds the placeholders of .env.example;
#  2. migrates the metadata database (Postgres);
#  3. writes the SimpleAuthManager passwords file from AIRFLOW_ADMIN_PASSWORD (mode 600);
#  4. hands the data root, the logs and the passwords file to AIRFLOW_UID:0, the user every
#     Airflow and Spark container runs as, so that the Spark executors and the Airflow tasks
#     can write each other's files.
set -euo pipefail

uid="${AIRFLOW_UID:-50000}"
data_root="${IMGSIM_DATA_ROOT:?IMGSIM_DATA_ROOT is not set}"
passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?not set}"
logs="${AIRFLOW__LOGGING__BASE_LOG_FOLDER:-/opt/airflow/logs}"

if env | grep -q 'change-me'; then
    echo "airflow-init: a secret still holds its .env.example placeholder ('change-me...')." >&2
    echo "airflow-init: generate the secrets first: docker/make-env.sh > .env (docs/scale-out.md)" >&2
    exit 1
fi
: "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD in .env}"

mkdir -p "$data_root" "$logs" "$(dirname "$passwords")"

echo "airflow-init: migrating the metadata database"
airflow db migrate

echo "airflow-init: writing $passwords"
python - <<'PY'
import json
import os

path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
users = [u.split(":")[0] for u in
         os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin").split(",")
         if u.strip()]
password = os.environ["AIRFLOW_ADMIN_PASSWORD"]
tmp = path + ".tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    json.dump({u.strip(): password for u in users}, fh)
    fh.write("\n")
os.replace(tmp, path)
PY

chown "$uid:0" "$data_root" "$(dirname "$passwords")" "$passwords"
chmod 2775 "$data_root"
chown -R "$uid:0" "$logs"
chmod -R g+rwX "$logs"
airflow version
echo "airflow-init: done (data root $data_root, owner $uid:0)"
