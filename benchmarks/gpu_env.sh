# Sourced by the one-call GPU scripts (repo root, on the GPU machine): installs the carried DeepSpeed wheels from
# .whl/ (see ../shared/tools/gpu-wheels) into /tmp/site and puts them and this checkout on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
