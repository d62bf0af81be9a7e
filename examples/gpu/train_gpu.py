"""A real training step on the GPU rtrain leased: a small MLP on random data, 200 steps."""
import os
import sys
import time

import torch

vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
print("CUDA_VISIBLE_DEVICES=%s" % vis)
print("RTRAIN_JOB_ID=%s" % os.environ.get("RTRAIN_JOB_ID"))
assert torch.cuda.is_available(), "no CUDA"
print("device_count=%d name=%s" % (torch.cuda.device_count(), torch.cuda.get_device_name(0)))
torch.manual_seed(0)
dev = torch.device("cuda")
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10)).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(8192, 1024, device=dev)
y = torch.randint(0, 10, (8192,), device=dev)
hold = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
t0 = time.time()
for step in range(200):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step in (0, 199):
        print("step %d loss %.4f" % (step, loss.item()), flush=True)
torch.cuda.synchronize()
print("200 steps in %.2fs; memory allocated %.0f MiB" % (time.time() - t0, torch.cuda.memory_allocated() / 2**20))
time.sleep(hold)
