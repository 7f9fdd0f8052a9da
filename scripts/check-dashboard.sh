#!/usr/bin/env bash
# Type-check grafana/taproot.json against @grafana/schema's Dashboard type (tsc --noEmit --strict).
# Installs the two pinned npm packages (grafana/validate/package-lock.json) on first use.
# Without npm it prints a SKIP line, unless TAPROOT_REQUIRE_DASHBOARD_CHECK=1 (CI): then it fails.
set -euo pipefail
cd "$(dirname "$0")/../grafana/validate"
if ! command -v npm >/dev/null; then
    if [ "${TAPROOT_REQUIRE_DASHBOARD_CHECK:-}" = 1 ]; then
        echo "dashboard check: npm is required (TAPROOT_REQUIRE_DASHBOARD_CHECK=1)" >&2
        exit 1
    fi
    echo "SKIP dashboard check: npm is not installed"
    exit 0
fi
if [ ! -x node_modules/.bin/tsc ] || [ ! -d node_modules/@grafana/schema ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
npm run --silent check
echo "dashboard check: grafana/taproot.json satisfies @grafana/schema's Dashboard (tsc --noEmit --strict)"
