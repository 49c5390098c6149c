#!/usr/bin/env bash
# tpu_scripts/delete.sh ARGS... == python3 tpu_scripts/tpu.py delete ARGS... (see tpu.py --help)
exec python3 "$(dirname "$0")/tpu.py" delete "$@"
