#!/usr/bin/env bash
# What the scale-out tests (tests/deploy.rs) need, installed by the
# test set-up (tests/setup.sh calls this), never by hand:
#   kubectl (with its built-in kustomize)  Debian/apt: `kubectl`, else `kubernetes-client`
#   deploy/.venv/                          PyPI kubernetes-validate (pinned), PyYAML
#   slurmctld slurmd slurm-client munge    Debian/apt, for tests/slurm.rs (a real one-node
#                                          Slurm the test starts and stops itself; no systemd)
# Idempotent and quick when everything is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/deploy/.venv"
KV_VERSION=1.37.0
log() { echo "deploy/setup: $*"; }
die() { echo "deploy/setup: ERROR: $*" >&2; exit 1; }

apt_install() {  # PACKAGE...: only as root with apt; says why otherwise
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}

if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  log "kubectl ok ($(kubectl version --client 2>/dev/null | head -1))"
else
  log "installing kubectl (renders deploy/k8s with its kustomize)"
  { apt-get update -qq && { apt_install kubectl || apt_install kubernetes-client; }; } \
    || die "cannot install kubectl (apt packages kubectl or kubernetes-client; needs root and apt)"
fi

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
  && command -v munged >/dev/null; then
  log "slurm ok ($(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo installed))"
else
  log "installing Debian's slurmctld slurmd slurm-client munge (tests/slurm.rs)"
  { apt-get update -qq && apt_install slurmctld slurmd slurm-client munge; } \
    || die "cannot install slurmctld slurmd slurm-client munge (needs root and apt)"
fi

if [ -x "$VENV/bin/kubernetes-validate" ] && [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" = "$KV_VERSION" ]; then
  log "kubernetes-validate ok ($VENV)"
else
  log "installing kubernetes-validate==$KV_VERSION into $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
  PIP_NO_INPUT=1 "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" \
    || die "pip install kubernetes-validate==$KV_VERSION failed (needs PyPI access)"
fi
