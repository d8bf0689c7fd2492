import torch, time, sys
import torch.nn.functional as F
torch.set_num_threads(2)
from theorylab.attention import *
from theorylab.bench.attention import matmul_gflops, _performer
def t(f, r=3):
    f(); ts=[]
    for _ in range(r):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return min(ts)
print("torch", torch.__version__, torch.get_num_threads(), "matmul", matmul_gflops(), flush=True)
B,H,D,M=1,8,64,256
fm = PositiveRandomFeatures(D,M,seed=0)
N=16384
q,k,v=[torch.randn(B,H,N,D) for _ in range(3)]
with torch.no_grad():
    for C in [32, 64,128,256]:
        print("causal C",C, t(lambda: linear_attention(q,k,v,fm,causal=True, chunk_size=C)), flush=True)
    for C in [128,256,512,1024,4096]:
        print("noncausal C",C, t(lambda: linear_attention(q,k,v,fm,causal=False, chunk_size=C)), flush=True)
    print("sdpa causal", t(lambda: F.scaled_dot_product_attention(q,k,v,is_causal=True),1), flush=True)
    print("sdpa", t(lambda: F.scaled_dot_product_attention(q,k,v),1), flush=True)
    p=_performer(False); print("performer nc", t(lambda: p(q,k,v),1), flush=True)
