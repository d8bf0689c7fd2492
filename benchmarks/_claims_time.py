import time, sys
import torch
t0 = time.perf_counter()
from theorylab.claims import q3_attention as q
print("import", round(time.perf_counter() - t0, 2))
fns=[("3.1", q.cost_of_standard_attention), ("3.2", q.separable_attention_claim), ("3.3", q.kernelised_attention_claim), ("3.4", q.positive_random_features_claim), ("3.5", q.choice_of_m_claim)]
for quick in (True, False):
    tot=0; res=[]
    for cid, fn in fns:
        t=time.perf_counter(); ev=fn(0, quick); dt=time.perf_counter()-t; tot+=dt
        res.append(f"{cid}:{'ok' if ev.confirmed else 'FAIL'}({dt:.1f})")
    print("quick" if quick else "full", " ".join(res), f"total {tot:.1f}", flush=True)
