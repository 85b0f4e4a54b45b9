#!/usr/bin/env bash
# Container entrypoint: write the Triton model repository from the exported model dirs under
# $FEWSTEP_MODELS (`fewstep serve --dry-run`), then run the container's tritonserver on it.
# Extra arguments go to tritonserver. Settings (environment):
#   FEWSTEP_MODELS        exported model dirs, one per subfolder (default /models)
#   FEWSTEP_REPO          where the repository is written (default /srv/repo; must be writable)
#   FEWSTEP_JUMP_BACKEND  <name>_jump on Triton's onnxruntime (default), tensorrt or python backend
#   FEWSTEP_DEVICE        gpu (default), cpu or auto: where <name>_jump runs
#   FEWSTEP_SERVE_ARGS    more `fewstep serve` options, e.g. "--instances 2 --workers 16"
#   FEWSTEP_TRITON_CONTAINER  the Triton release whose TensorRT and onnxruntime the exports are
#                         checked against (default: NVIDIA_TRITON_SERVER_VERSION, set by the image)
#   FEWSTEP_GRACE         seconds SIGTERM lets the requests in flight finish (default 30, as
#                         `fewstep serve --grace`; the Deployment's terminationGracePeriodSeconds
#                         covers it and its preStop)
#   FEWSTEP_ADMIN_KEY     when set, Triton's admin protocols (model repository, shared memory,
#                         logging, trace) answer only gRPC calls that carry it in the header
#                         triton-grpc-protocol-fewstep-admin-key (Triton adds the prefix); the
#                         protocols and the header are serving.launcher's RESTRICTED, ADMIN_HEADER
set -euo pipefail

models_dir=${FEWSTEP_MODELS:-/models}
repo=${FEWSTEP_REPO:-/srv/repo}
model_args=()
for dir in "$models_dir"/*/; do
  if [ -f "$dir/manifest.json" ]; then
    model_args+=(--model "${dir%/}")
  fi
done
if [ ${#model_args[@]} -eq 0 ]; then
  echo "fewstep: no exported model dir (a folder with manifest.json) under $models_dir;" \
       "mount one there or build with --build-arg MODELS=DIR" >&2
  exit 2
fi

# The sampler reaches <name>_jump by BLS (the only way to a native-backend jump).
# shellcheck disable=SC2086  # FEWSTEP_SERVE_ARGS is a list of options
fewstep serve --dry-run --repo "$repo" "${model_args[@]}" \
  --jump-backend "${FEWSTEP_JUMP_BACKEND:-onnxruntime}" --device "${FEWSTEP_DEVICE:-gpu}" --jump bls \
  ${FEWSTEP_SERVE_ARGS:-} >/dev/null

admin=()
if [ -n "${FEWSTEP_ADMIN_KEY:-}" ]; then
  admin=(--grpc-restricted-protocol="shared-memory,model-repository,logging,trace:fewstep-admin-key=${FEWSTEP_ADMIN_KEY}")
fi

# gRPC for clients (and the probes) and metrics for Prometheus on every address; HTTP off, as
# in `fewstep serve` (a large HTTP body can crash this Triton release).
exec tritonserver \
  --model-repository="$repo" \
  --grpc-address=0.0.0.0 --grpc-port=8001 \
  --allow-http=false \
  --metrics-address=0.0.0.0 --metrics-port=8002 \
  --strict-readiness=true --exit-on-error=true --exit-timeout-secs="${FEWSTEP_GRACE:-30}" \
  --model-control-mode=none \
  "${admin[@]}" "$@"
