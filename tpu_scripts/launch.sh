#!/usr/bin/env bash
# tpu_scripts/launch.sh ARGS... == python3 tpu_scripts/tpu.py launch ARGS... (see tpu.py --help)
exec python3 "$(dirname "$0")/tpu.py" launch "$@"
