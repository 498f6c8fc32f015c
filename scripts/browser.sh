#!/usr/bin/env bash
# Headless Chromium for the report's browser test (tests/test_report.py): Debian's chromium and
# chromium-driver. Installed with apt-get when this runs as root; otherwise a note says the test
# will be skipped. Never fails: the rest of the suite runs either way.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver (apt-get) for the report's browser test"
  if apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; then
    exit 0
  fi
  echo "note: apt-get could not install chromium chromium-driver; the browser test will be skipped"
else
  echo "note: chromium and chromedriver are not installed, so the report's browser test" \
    "(tests/test_report.py::test_report_in_headless_chromium) will be skipped;" \
    "on Debian/Ubuntu: sudo apt-get install chromium chromium-driver"
fi
