#!/bin/bash
# On a machine with a real NVIDIA GPU, PyTorch and rtrain's Python dependencies (rich, pyyaml,
# pathspec): the agent against the real nvidia-smi, and real training steps as rtrain jobs on the
# built-in `local` host. Prints what it saw; keeps raw nvidia-smi captures in $OUT (default
# /tmp/rtrain-gpu-check) for the parser's fixtures. Usage: bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rtrain-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export RTRAIN_HOME=$(mktemp -d /tmp/rtrain-home.XXXX) RTRAIN_LOCK_DIR=$(mktemp -d /tmp/rtrain-locks.XXXX)
chmod 1777 "$RTRAIN_LOCK_DIR"
rt() { python3 -m launcher "$@"; }
say() { printf '\n== %s\n' "$*"; }
F=index,uuid,pci.bus_id,name,mig.mode.current,compute_mode,memory.total,memory.used,memory.free,utilization.gpu
A=gpu_uuid,pid,used_memory,process_name

say "machine"; python3 --version; nvidia-smi --version 2>&1 | head -3
python3 -c "import torch, rich, yaml, pathspec; print('torch', torch.__version__)"
nvidia-smi > "$OUT/table-idle.txt" 2>&1; head -12 "$OUT/table-idle.txt"
nvidia-smi --query-gpu=$F --format=csv,nounits > "$OUT/query-gpu-idle.csv" 2>&1
nvidia-smi --query-compute-apps=$A --format=csv,nounits > "$OUT/query-apps-idle.csv" 2>&1
nvidia-smi -L > "$OUT/list-L.txt" 2>&1
nvidia-smi -q -x > "$OUT/q-x.xml" 2>&1
cat "$OUT/query-gpu-idle.csv" "$OUT/list-L.txt"

say "the agent's parser on the real nvidia-smi"
python3 - <<'PY'
import json
from launcher.agent import gpus
from launcher.agent.settings import Settings
for u in gpus.read(Settings()):
    print(json.dumps({k: u.get(k) for k in ("index", "uuid", "name", "memory_used", "memory_total",
                                            "utilization", "state", "reason")}))
PY
rt gpus; rt hosts

say "job 1: a real training step on the leased GPU, held 25 s after"
cd examples/gpu
J1=$(rt submit -q --gpus 1 -- python3 train_gpu.py 25)
t0=$(date +%s.%N)
until rt status --json "$J1" | grep -q '"state": "running"'; do sleep 0.2; done
echo "job $J1 running after $(python3 -c "import time;print(round(time.time()-$t0,2))") s"
sleep 8
nvidia-smi --query-compute-apps=$A --format=csv,nounits > "$OUT/query-apps-busy.csv" 2>&1
nvidia-smi > "$OUT/table-busy.txt" 2>&1
cat "$OUT/query-apps-busy.csv"
rt gpus
say "job 2 (1 GPU) waits for job 1's lease"
J2=$(rt submit -q --gpus 1 -- python3 train_gpu.py)
sleep 2; rt status "$J2" | grep -E "state|gpus"
rt logs "$J1" -f; echo "job $J1 exit $?"
say "job 2 starts when job 1 ends"
rt logs "$J2" -f; echo "job $J2 exit $?"
python3 - "$J1" "$J2" <<'PY'
import json, subprocess, sys
rows = [json.loads(subprocess.run([sys.executable, "-m", "launcher", "status", "--json", j],
                                  capture_output=True, text=True).stdout) for j in sys.argv[1:]]
for r in rows:
    print(r["id"], r["state"], r["exit_code"], r["gpus"], "started %.3f ended %.3f" % (r["started_at"], r["ended_at"]))
print("hand-off: job 2 started %.3f s after job 1 ended" % (rows[1]["started_at"] - rows[0]["ended_at"]))
PY

say "a foreign process (not rtrain's) holding GPU memory: the GPU is busy, a GPU job waits"
python3 -c "import torch,time; x=torch.empty(8<<30, dtype=torch.uint8, device='cuda'); print('foreign holds 8 GiB', flush=True); time.sleep(30)" &
FP=$!
sleep 10
rt gpus
J3=$(rt submit -q --gpus 1 -- python3 train_gpu.py)
sleep 3; rt status "$J3" | grep -E "state"
kill $FP; wait $FP 2>/dev/null
rt logs "$J3" -f; echo "job $J3 exit $?"

say "cancel of a running GPU job frees its GPU"
J4=$(rt submit -q --gpus 1 -- python3 train_gpu.py 300)
until rt status --json "$J4" | grep -q '"state": "running"'; do sleep 0.2; done
sleep 5
rt cancel "$J4"; rt status "$J4" | grep -E "state|exit"
sleep 1; rt gpus
cd ../..
cp "$RTRAIN_HOME/daemon.log" "$OUT/daemon.log" 2>/dev/null
rt status --all
