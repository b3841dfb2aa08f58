"""Can a process pin torch's kernels to AVX2 after `import torch` (issue 32: students trained alike on every x86
CPU)? Trains a small MLP 50 AdamW steps and prints the dispatched ISA and a hash of the weights.

    python benchmarks/probe_isa_caps.py native
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/probe_isa_caps.py envcaps
    python benchmarks/probe_isa_caps.py inproc   # the same caps set in os.environ after import, before any op
"""

import hashlib
import os
import sys

import torch

if sys.argv[1] == "inproc":  # after the import, before the first op: torch reads the caps lazily
    os.environ.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
torch.manual_seed(0)
torch.set_num_threads(1)
m = torch.nn.Sequential(
    torch.nn.Linear(96, 384), torch.nn.GELU(), torch.nn.LayerNorm(384), torch.nn.Linear(384, 640)
)
opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
x = torch.randn(64, 96)
y = torch.randint(0, 640, (64,))
for _ in range(50):
    loss = torch.nn.functional.cross_entropy(m(x).softmax(-1).log(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()[:16]
print(sys.argv[1], torch.backends.cpu.get_cpu_capability(), h, float(loss.detach()))
