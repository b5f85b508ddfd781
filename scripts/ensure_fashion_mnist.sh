#!/usr/bin/env bash
# Make sure Fashion-MNIST is where unikd looks by default (Debian's dataset-fashion-mnist package).
# Installs the package when the files are missing and apt is available; otherwise says what to do.
set -euo pipefail
root=/usr/share/datasets/fashion-mnist
if [ -f "$root/train-images-idx3-ubyte.gz" ] || [ -f "$root/train-images-idx3-ubyte" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST is not in $root and apt-get is not available: put the idx files in a folder and pass" >&2
  echo "data.root=FOLDER (files: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)." >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing Debian's dataset-fashion-mnist (Fashion-MNIST in $root) ..."
$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
}
