#!/bin/sh
# Print a .env for docker-compose.yaml: .env.example with every 'change-me' placeholder replaced
# by a freshly generated secret (hex strings, so they are safe inside the database and broker
# URLs; the Fernet key as Airflow expects it). Nothing is written unless you redirect it:
#
#   docker/make-env.sh > .env && chmod 600 .env
#
# Needs only python3 (standard library).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
exec python3 - "$here/../.env.example" <<'PY'
import base64
import os
import re
import secrets
import sys

for line in open(sys.argv[1], encoding="utf-8").read().splitlines():
    m = re.fullmatch(r"([A-Z0-9_]+)=(change-me\S*)", line)
    if not m:
        print(line)
        continue
    key = m.group(1)
    if "FERNET" in key:
        value = base64.urlsafe_b64encode(os.urandom(32)).decode()
    else:
        value = secrets.token_hex(24)
    print(f"{key}={value}")
PY
