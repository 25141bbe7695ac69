#!/bin/sh
# The Docker API served by podman, for what speaks it (`tumorflow run --runner docker`: kfp.local's
# DockerRunner, through the docker Python package) where no docker daemon runs:
#   sh infra/podman-docker-api.sh [SOCKET] &      (SOCKET: unix:///tmp/podman.sock)
#   export DOCKER_HOST=unix:///tmp/podman.sock
# podman (run as root) sees the images buildah built: they share one local store.
# Sandboxes like this project's build machines need two settings, harmless elsewhere:
# - runc, where installed: crun refuses a host with cgroup v1 and v2 controllers mounted at once
#   ("cgroups in hybrid mode not supported");
# - rlimits below the host's: podman's defaults (the host's maxima) cannot be set in the container
#   without CAP_SYS_RESOURCE ("setrlimit RLIMIT_NOFILE: Operation not permitted").
set -eu

SOCKET=${1:-unix:///tmp/podman.sock}
command -v podman >/dev/null || { echo "podman-docker-api: podman is not installed" >&2; exit 2; }

CONF=${XDG_RUNTIME_DIR:-/tmp}/tumorflow-podman-containers.conf
nofile=$(ulimit -n)
[ "$nofile" = unlimited ] || [ "$nofile" -gt 10000 ] && nofile=10000
{
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=4096:4096\"]"
    if command -v runc >/dev/null; then
        echo "[engine]"
        echo "runtime = \"runc\""
    fi
} >"$CONF"
export CONTAINERS_CONF="$CONF"
echo "podman-docker-api: serving $SOCKET (set DOCKER_HOST=$SOCKET)" >&2
exec podman system service --time=0 "$SOCKET"
