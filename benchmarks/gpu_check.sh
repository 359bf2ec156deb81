#!/usr/bin/env bash
# The device check (see benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh [--json OUT] [--tiny --device cpu]
exec python "$(dirname "$0")/gpu_check.py" "$@"
