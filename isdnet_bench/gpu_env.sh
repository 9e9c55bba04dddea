# Sourced by the GPU scripts (gpu_table.sh, gpu_speed.sh), run from the repository root: puts the repository on
# PYTHONPATH and, on a machine that cannot download (the device tool's H200), installs the wheels found in .whl/
# (SimpleITK, jsonschema, ...) into /tmp/isdnet-site. PYTHON names the interpreter (default python3).
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/isdnet-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/isdnet-site"
fi
export PYTHONUNBUFFERED=1
