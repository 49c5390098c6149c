#!/usr/bin/env bash
# tpu_scripts/stop.sh ARGS... == python3 tpu_scripts/tpu.py stop ARGS... (see tpu.py --help)
exec python3 "$(dirname "$0")/tpu.py" stop "$@"
