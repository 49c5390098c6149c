#!/usr/bin/env bash
# tpu_scripts/logs.sh ARGS... == python3 tpu_scripts/tpu.py logs ARGS... (see tpu.py --help)
exec python3 "$(dirname "$0")/tpu.py" logs "$@"
