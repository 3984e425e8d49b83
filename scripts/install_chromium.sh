#!/usr/bin/env bash
# Installs Debian's headless Chromium for the review page's browser test, when missing.
# Needs root (CI and these machines run as root); elsewhere the browser test skips itself.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: not root or no apt-get; the browser test will be skipped" >&2
  exit 0
fi
echo "install_chromium: installing Debian's chromium (once)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null \
  || echo "install_chromium: apt-get failed; the browser test will be skipped" >&2
exit 0
