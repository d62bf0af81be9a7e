"""A stand-in for a real training script (stdlib only): learns character bigram counts from
data/input.txt a few lines per step, checkpoints to out/ckpt.json, and resumes from there, so
a second job goes on where the first stopped (rtrain.yaml `outputs: [out]`)."""
import json
import os
import sys

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
os.makedirs("out", exist_ok=True)
ckpt = "out/ckpt.json"
state = {"step": 0, "counts": {}}
if os.path.exists(ckpt):
    with open(ckpt) as f:
        state = json.load(f)
    print("resuming from step %d" % state["step"])
lines = open("data/input.txt").read().splitlines()
for _ in range(steps):
    line = lines[state["step"] % len(lines)]
    for a, b in zip(line, line[1:]):
        state["counts"][a + b] = state["counts"].get(a + b, 0) + 1
    state["step"] += 1
    top = max(state["counts"].items(), key=lambda kv: kv[1]) if state["counts"] else ("", 0)
    print("step %d  bigrams %d  most common %r" % (state["step"], len(state["counts"]), top[0]))
with open(ckpt + ".tmp", "w") as f:
    json.dump(state, f)
os.replace(ckpt + ".tmp", ckpt)
print("saved", ckpt)
