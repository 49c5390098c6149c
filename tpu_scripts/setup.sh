#!/usr/bin/env bash
# tpu_scripts/setup.sh ARGS... == python3 tpu_scripts/tpu.py setup ARGS... (see tpu.py --help)
exec python3 "$(dirname "$0")/tpu.py" setup "$@"
