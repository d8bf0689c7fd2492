# untracked helper for the lent device: performer-pytorch from the local venv, 2 pinned cores
mkdir -p /tmp/pp && cp -r .venv/lib/python3.11/site-packages/{performer_pytorch,einops,local_attention,axial_positional_embedding,hyper_connections,torch_einops_utils} /tmp/pp/
python3 -c "import distutils.version" 2>/dev/null || { mkdir -p /tmp/pp/distutils; touch /tmp/pp/distutils/__init__.py; cat > /tmp/pp/distutils/version.py <<'PY'
import re
class LooseVersion:
    def __init__(self, s): self.v = tuple(int(x) for x in re.findall(r"\d+", str(s))[:3])
    def __ge__(self, o): return self.v >= o.v
    def __lt__(self, o): return self.v < o.v
    def __gt__(self, o): return self.v > o.v
    def __le__(self, o): return self.v <= o.v
PY
}
export PYTHONPATH=$PWD/src:/tmp/pp OMP_NUM_THREADS=2
