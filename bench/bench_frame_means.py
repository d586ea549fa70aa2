"""Benchmark: the frame means of q and k beside the Gluon forward (all-layer fused capture's attn_logit), torch's
mean against `frame_means_into` (models/common/triton_attention.py) with several tilings, at the 1.3B rollout's
shapes: q 3 frames x 1560 tokens, k 3..21 frames of a 21-frame cache, 12 heads x 128, bf16.

    python3 bench/bench_frame_means.py [--calls 20] [--repeats 5]

Per tiling: GPU ms per call pair (q and k) at each key length, the rollout's total (150 calls at each of the
7 key lengths: 7 chunks x 5 forwards x 30 layers / 7), the HBM bandwidth that total implies (bytes of q and k
read once), and the largest error against a float64 mean (a wrong tiling fails the run). Each variant's calls
are timed as replays of a CUDA graph (the rollout's way: a call is 5-40 us of GPU time, less than its launch).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.common.triton_attention import MEANS_TILE, frame_means_into  # noqa: E402

FSL, H, D, NQF = 1560, 12, 128, 3
KEY_FRAMES = (3, 6, 9, 12, 15, 18, 21)


def torch_means(x, out):
    B, L = x.shape[:2]
    out.copy_(x.reshape(B, L // FSL, FSL, H, D).mean(2, dtype=torch.float32).transpose(1, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="", help="write the fastest tiling here as a frame_attention config update "
                                              "(bench_capture.py --also-fused FILE)")
    args = ap.parse_args()
    print(f"# bench_frame_means  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"# command: {' '.join(sys.argv)}")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, NQF * FSL, H, D, generator=g, device="cuda").to(torch.bfloat16)
    cache = torch.randn(1, 21 * FSL, H, D, generator=g, device="cuda").to(torch.bfloat16)
    variants = {"torch": None}
    for br, sub, bc, w in itertools.product((64, 128, 256, 512), (32, 64), (128, 256, 512), (4, 8)):
        if sub <= br and sub * bc <= 64 * 512:
            variants[f"r{br} s{sub} c{bc} w{w}"] = dict(block_r=br, sub=sub, block_c=bc, num_warps=w)
    rows = []
    for name, tile in variants.items():
        per = []
        err = 0.0
        for nkf in KEY_FRAMES:
            k = cache[:, : nkf * FSL]
            qo = torch.empty(1, H, NQF, D, device="cuda")
            ko = torch.empty(1, H, nkf, D, device="cuda")

            def pair():
                if tile is None:
                    torch_means(q, qo)
                    torch_means(k, ko)
                else:
                    frame_means_into(q, FSL, qo, tile)
                    frame_means_into(k, FSL, ko, tile)
            pair()
            want = k.double().reshape(1, nkf, FSL, H, D).mean(2).transpose(1, 2)
            err = max(err, (ko.double() - want).abs().max().item())
            graph = torch.cuda.CUDAGraph()  # as the rollout runs them: in a CUDA graph, no host time between calls
            with torch.cuda.graph(graph):
                for _ in range(args.calls):
                    pair()
            graph.replay()
            times = []
            for _ in range(args.repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / args.calls)
            per.append(statistics.median(times))
            del graph
        total = 150 * sum(per) / 1000
        gbytes = 150 * sum((NQF + n) * FSL * H * D * 2 for n in KEY_FRAMES) / 1e9
        assert err < 1e-5, f"{name}: error {err:.2e} against float64"
        rows.append((total, name, per, gbytes / total, err))
        print(f"{name:22s} " + " ".join(f"{p:.4f}" for p in per) + f"  rollout {total * 1000:6.1f} ms  "
              f"{gbytes / total / 1000:.2f} TB/s  err {err:.1e}", flush=True)
    rows.sort()
    if args.json:
        best = next(r for r in rows if r[1] != "torch")
        Path(args.json).write_text(json.dumps({"MEANS": "triton", "MEANS_TILE": variants[best[1]]}))
    print(f"\nfastest first (default tiling {MEANS_TILE}):")
    for total, name, per, bw, err in rows[:10]:
        print(f"  {name:22s} {total * 1000:6.1f} ms per rollout, {bw / 1000:.2f} TB/s")
    print(f"  torch: {next(r[0] for r in rows if r[1] == 'torch') * 1000:.1f} ms")


if __name__ == "__main__":
    main()
