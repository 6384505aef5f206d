#!/usr/bin/env bash
# The GPU check: on one GPU, in about 8 minutes, every speed figure of docs/speed.md and the test suite.
#
#     bash gpu_check.sh            # prints everything; each part has its own time limit and a failing
#                                  # part is reported and skipped, never the end of the check
#
# Needs no internet: a generated folder of random 32x32 colour images stands in for CIFAR-10 (the speed
# does not depend on the pixels). Without a GPU it runs the same parts, smaller, on the CPU.
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$gpu" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    preset=cifar10 steps=300 images=3840 sample="--preset cifar10 --batch 256 --steps 100 --repeats 2"
else
    echo "no CUDA GPU: the parts run on the CPU, smaller"
    preset=digits steps=30 images=512 sample="--preset digits --batch 64 --steps 50 --repeats 2"
fi
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

part() {  # part SECONDS TITLE COMMAND...: run it with a time limit; say how it ended
    local limit=$1 title=$2
    shift 2
    echo; echo "== $title"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=20 "$limit" "$@"
    local code=$?
    if [ $code -eq 0 ]; then echo "-- ok ($((SECONDS - start)) s)"
    elif [ $code -eq 124 ]; then echo "-- STOPPED after its limit of $limit s"
    else echo "-- FAILED (exit $code, $((SECONDS - start)) s)"; fi
}

python - "$work/images" "$images" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
folder, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{folder}/train")
rng = np.random.default_rng(0)
for i in range(n):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{folder}/train/{i:05d}.png")
EOF

fast="--amp bf16 --compile on"
data="--dataset $work/images --image-size 32 --preset $preset"
part 170 "bench.py train: train.py's step, side by side" python bench.py train --repeats 5
part 100 "train.py --config cifar10 $fast, $steps steps (steps/s after the first 100)" \
    python train.py --config cifar10 $data $fast --steps $steps --log-every 50 --ckpt-every 100000 \
    --n-samples 16 --out "$work/fast"
python - "$work/fast/loss.csv" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1]))] if __import__("os").path.exists(sys.argv[1]) else []
late = [r for r in rows if int(r["step"]) >= 100]
if len(late) >= 2:
    a, b = late[0], late[-1]
    rate = (int(b["step"]) - int(a["step"])) / (float(b["seconds"]) - float(a["seconds"]))
    print(f"   {rate:.1f} steps/s = {128 * rate:,.0f} images/s after warm-up (steps {a['step']} to {b['step']})")
EOF
part 60 "python train.py: the digits default, end to end" python train.py --out "$work/digits"
part 60 "torchrun --standalone --nproc_per_node=1" torchrun --standalone --nproc_per_node=1 train.py \
    --config cifar10 $data --steps 20 --log-every 10 --n-samples 4 --out "$work/ddp"
part 45 "bench.py sample: images/s of the sampler, and 50,000 samples for FID" python bench.py sample $sample
part 120 "pytest -m 'not slow' (the GPU tests included)" python -m pytest -q -m "not slow" -p no:cacheprovider
