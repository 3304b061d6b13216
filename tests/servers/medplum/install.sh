#!/bin/sh
# Install Medplum's FHIR engine for the contract tests (node_modules stays out of git).
set -eu
cd "$(dirname "$0")"
if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund
else
    npm install --no-audit --no-fund
fi
