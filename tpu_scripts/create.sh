#!/usr/bin/env bash
# tpu_scripts/create.sh ARGS... == python3 tpu_scripts/tpu.py create ARGS... (see tpu.py --help)
exec python3 "$(dirname "$0")/tpu.py" create "$@"
