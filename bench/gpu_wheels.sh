#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels bench/gpu.sh installs on a GPU machine that has PyTorch
# but no index: the packages this project and open_clip need beyond that machine's image, for Python 3.12.
#   bash bench/gpu_wheels.sh          # -> .whl/ (git-ignored), .whl/old/ (webdataset 0.2.86 for open_clip)
# Then, with the device tool: run(command='bash bench/gpu.sh', carry=['.whl'], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
fetch() {  # fetch DIR NAME==VERSION...
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$@"
}
mkdir -p .whl/old
fetch .whl open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 \
  antlr4-python3-runtime==4.13.2 ftfy==6.3.1 wcwidth==0.9.4
fetch .whl/old webdataset==0.2.86
ls -la .whl .whl/old
du -sh .whl
