#!/usr/bin/env sh
# Usage: scripts/system-packages.sh NEED...   NEED: java17 | maven | redis
# Installs with apt-get what is missing of NEED (as root, as CI runs). Otherwise stops at once
# with one line naming the command to run. Prints nothing when all is there.
set -eu

missing=""
for need in "$@"; do
  case "$need" in
    java17)
      # a JDK, not only a JRE (Maven compiles), of version 17 or later
      major=$(javac -version 2>&1 | sed -n 's/^javac \([0-9][0-9]*\).*/\1/p')
      [ -n "$major" ] && [ "$major" -ge 17 ] || missing="$missing openjdk-17-jdk-headless" ;;
    maven) command -v mvn >/dev/null 2>&1 || missing="$missing maven" ;;
    redis) command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server" ;;
    *) echo "system-packages.sh: unknown need '$need'" >&2; exit 2 ;;
  esac
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages:$missing. Run: sudo apt-get install -y$missing (then make again)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Missing system packages:$missing, and no apt-get here: install them with your package manager" >&2
  exit 1
fi
echo "Installing system packages:$missing (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
