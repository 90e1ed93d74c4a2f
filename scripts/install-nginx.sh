#!/usr/bin/env bash
# Install nginx from Debian (the reverse proxy in front of the SuperLink, docs/deployment.md).
# Idempotent: does nothing when an nginx binary with the ssl module is already there.
# Changes no system-wide nginx configuration and starts no service: privrad runs nginx as
# a child process with its own prefix, config, pid and logs (simulations.proxy).
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  if "$NGINX" -V 2>&1 | grep -q -- '--with-http_ssl_module'; then
    echo "nginx present: $("$NGINX" -v 2>&1)"
    exit 0
  fi
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
"$NGINX" -V 2>&1 | grep -q -- '--with-http_ssl_module'
echo "installed: $("$NGINX" -v 2>&1)"
