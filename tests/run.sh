#!/usr/bin/env bash
# Installs what the tests need into a virtualenv (default .venv, or $CURATE_VENV) and runs them.
# Offline except for package installs: tests talk to 127.0.0.1 only and never reach a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CURATE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# byte-compiled at install (pip's default): where PYTHONDONTWRITEBYTECODE is set, nothing is compiled later, and
# every Ray worker and subprocess would compile torch and Ray from source again (it doubled the suite's time)
"$VENV/bin/python" -m pip install --quiet -e '.[test]'

# The HTML report is checked in a real browser: headless Chromium from Debian's packages.
if ! command -v chromium > /dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver > /dev/null
fi

export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0
# Every pipeline that ships must validate.
"$VENV/bin/curate" validate pipelines/*.yaml
exec "$VENV/bin/python" -m pytest -q -p no:logging --durations=15 "$@"
