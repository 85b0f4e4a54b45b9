#!/bin/bash
# Stand-in for NVIDIA's /opt/nvidia/nvidia_entrypoint.sh: theirs prints the container's
# banner, runs /opt/nvidia/entrypoint.d/*.sh (CUDA forward compatibility among them) and execs
# its arguments. This one runs the same folder's parts, if any, and execs its arguments.
set -e
shopt -s nullglob
for part in /opt/nvidia/entrypoint.d/*.sh; do
  # shellcheck source=/dev/null
  source "$part"
done
if [ $# -eq 0 ]; then
  exec /bin/bash
fi
exec "$@"
