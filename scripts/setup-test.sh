#!/usr/bin/env bash
# What `make test` needs beyond .venv: Debian's chromium, which the dashboard tests drive
# headless. Installed with apt only when missing, without recommended packages, and only after
# printing what apt would install or upgrade (apt-get -s), so nothing else on the host changes
# unseen. `make demo` never runs this.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-test: /usr/bin/chromium is missing and tests/api/test_dashboard.py needs it;" \
    "install it as root: apt-get install -y --no-install-recommends chromium" >&2
  exit 0
fi
apt-get update -q
echo "setup-test: apt would make these changes for chromium (the dashboard tests drive it):"
DEBIAN_FRONTEND=noninteractive apt-get -s install -y --no-install-recommends chromium \
  | grep -E '^(Inst|Remv) ' || true
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
