"""A stand-in training script: a few epochs of a tiny linear model on the CPU, stdlib only.
It prints the GPUs it was given and its progress, as a real script would."""
import os
import random
import time

random.seed(0)
print("job %s sees CUDA_VISIBLE_DEVICES=%r" % (os.environ.get("RTRAIN_JOB_ID"),
                                               os.environ.get("CUDA_VISIBLE_DEVICES")))
xs = [random.uniform(-1, 1) for _ in range(200)]
ys = [3.0 * x + 0.5 + random.gauss(0, 0.1) for x in xs]
w, b, lr = 0.0, 0.0, 0.1
for epoch in range(1, 6):
    gw = sum((w * x + b - y) * x for x, y in zip(xs, ys)) * 2 / len(xs)
    gb = sum((w * x + b - y) for x, y in zip(xs, ys)) * 2 / len(xs)
    w, b = w - lr * gw * 5, b - lr * gb * 5
    loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
    print("epoch %d  loss %.4f  w %.3f  b %.3f" % (epoch, loss, w, b))
    time.sleep(0.2)
print("done")
