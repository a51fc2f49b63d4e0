#!/bin/sh
# Installs the exact JS dependencies of the JS/Motoko tests from package-lock.json (npm ci never changes the
# lock). Prefers the local npm cache, so it also works offline once the cache is warm.
set -eu
cd "$(dirname "$0")"
if ! command -v npm >/dev/null 2>&1; then
  echo "install.sh: npm is not installed; the JS and Motoko tests need Node.js >= 20 with npm" >&2
  exit 1
fi
exec npm ci --prefer-offline --no-audit --no-fund --loglevel=error
