#!/usr/bin/env bash
# Debian packages the project needs: Fashion-MNIST (data), and with --browser Chromium for the Space's browser tests.
set -euo pipefail
packages=(dataset-fashion-mnist)
if [[ "${1:-}" == "--browser" ]]; then packages+=(chromium); fi
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "Missing Debian packages: ${missing[*]}. Run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
