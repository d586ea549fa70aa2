"""Benchmark exact frame-aggregated attention on one GPU: stock SDPA vs the Triton kernels of workbench.kernels.

For the Wan-1.3B self-attention call of the last chunk (q = 3 latent frames x 1560 tokens, 12 heads x 128, bf16)
against Lk = 1560 x key frames (3, 12, 21 = chunks b = 0, 3, 6 of the KV-cache rollout, and 72), prints one
markdown table per Lk with, for each path: median time of --reps runs after warm-up (CUDA events; the first
call of a Triton kernel autotunes and compiles, inside the warm-up), the ratio to plain SDPA, TFLOP/s (of the
matmuls the path runs: 4*Lq*Lk*D*H for a forward, 2*Lq*Lk*D*H for an LSE recompute), the max abs error of the
frame mass against an fp32 materialised softmax and of the output against SDPA.

Paths: plain SDPA (default backend; on q.transpose(1, 2) views as the model calls it, and on contiguous
[B, H, L, D]), the cuDNN and flash SDPA ops with LSE, the fused forward + frame mass (the "fused" capture mode;
TMA and pointer loads), the same kernel without the frame bookkeeping (what the bookkeeping costs), the recompute
from the LSE (the "exact" capture mode on CUDA; alone and with the cuDNN LSE call), and the blockwise torch
reference (given the LSE).

Run from the repository root on a CUDA machine (needs only torch and triton):

    python bench/bench_frame_attention.py                     # all sizes, ~2-4 min on an H200
    python bench/bench_frame_attention.py --key-frames 21 --skip-reference
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.common import cuda_attention  # noqa: E402
from models.common.attention_kernels import select  # noqa: E402

DEVICE = "cuda"  # a CPU dry run of this script's logic sets "cpu" (and TRITON_INTERPRET=1)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key-frames", default="3,12,21,72",
                    help="comma-separated key frame counts (default: %(default)s)")
    ap.add_argument("--query-frames", type=int, default=3, help="query frames per call (default: %(default)s)")
    ap.add_argument("--frame-seq-len", type=int, default=1560, help="tokens per latent frame (default: %(default)s)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--reps", type=int, default=10, help="timed runs per path; the median is printed")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (autotuning happens here)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the (slow) blockwise torch reference row")
    return ap.parse_args()


def time_ms(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        import time

        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mass_fp32_materialised(q, k, fsl, scale):
    """Frame mass from an fp32 softmax materialised one query frame at a time: [B, H, nqf, nkf]."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    nqf, nkf = Lq // fsl, Lk // fsl
    kt = k.float().transpose(1, 2)  # [B, H, Lk, D]
    mass = torch.empty(B, H, nqf, nkf, device=q.device)
    for qf in range(nqf):
        qb = q[:, qf * fsl:(qf + 1) * fsl].float().transpose(1, 2)  # [B, H, fsl, D]
        p = torch.softmax(torch.matmul(qb, kt.transpose(-1, -2)) * scale, dim=-1)  # [B, H, fsl, Lk]
        mass[:, :, qf] = p.view(B, H, fsl, nkf, fsl).sum(dim=(2, 4)) / fsl
        del p
    return mass


def describe_machine(fa):
    import triton

    from models.common.triton_common import TensorDescriptor

    props = torch.cuda.get_device_properties(0)
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"host: {platform.node()}  python {platform.python_version()}",
        f"gpu: {props.name}, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
        f"triton {triton.__version__}",
        f"TMA descriptors usable: {TensorDescriptor is not None and props.major >= 9}",
    ]
    return "\n".join(lines)


def bench_one(fa, ref, args, nkf, dtype):
    B, H, D, fsl, nqf = args.batch, args.heads, args.head_dim, args.frame_seq_len, args.query_frames
    Lq, Lk = nqf * fsl, nkf * fsl
    scale = 1.0 / math.sqrt(D)
    g = torch.Generator(device=DEVICE).manual_seed(nkf)
    q = torch.randn(B, Lq, H, D, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(B, Lk, H, D, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(B, Lk, H, D, device=DEVICE, dtype=dtype, generator=g)
    qc, kc, vc = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, L, D]
    fwd_flop = 4.0 * B * H * Lq * Lk * D
    mass_want = mass_fp32_materialised(q, k, fsl, scale)
    out_want = F.scaled_dot_product_attention(qc, kc, vc, scale=scale).transpose(1, 2)  # [B, Lq, H, D]

    rows = []  # (name, ms, flop, mass_err, out_err, note)
    base_ms = None

    def run(name, fn, flop, get_mass=None, get_out=None, note="", reps=args.reps, warmup=args.warmup):
        nonlocal base_ms
        try:
            res = fn()
            ms = time_ms(fn, reps, warmup)
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            rows.append((name, None, flop, None, None, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            return None
        m_err = None if get_mass is None else (get_mass(res).float() - mass_want).abs().max().item()
        o_err = None if get_out is None else (get_out(res).float() - out_want.float()).abs().max().item()
        note = note() if callable(note) else note
        rows.append((name, ms, flop, m_err, o_err, note))
        if base_ms is None:
            base_ms = ms
        return res

    def cfg(tuned):
        c = getattr(tuned, "best_config", None)
        if c is None:
            return ""
        kw = ", ".join(f"{k}={v}" for k, v in c.kwargs.items())
        return f"{kw}, warps={c.num_warps}, stages={c.num_stages}"

    run("SDPA default, contiguous [B, H, L, D] (baseline)",
        lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=scale), fwd_flop, get_out=lambda r: r.transpose(1, 2))
    run("SDPA default (transposed views, as the model)",
        lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale),
        fwd_flop, get_out=lambda r: r.transpose(1, 2))
    run("cuDNN SDPA op + LSE", lambda: cuda_attention.cudnn(q, k, v, scale), fwd_flop, get_out=lambda r: r[0])
    run("flash SDPA op + LSE", lambda: cuda_attention.flash_op(q, k, v, scale), fwd_flop, get_out=lambda r: r[0])
    from models.common.triton_attention_plan import default_config

    run("fused: out + frame mass (default: TMA on sm90)",
        lambda: fa.frame_forward_with_stats(q, k, v, frame_seq_len=fsl, scale=scale), fwd_flop,
        get_mass=lambda r: r[1], get_out=lambda r: r[0], note=lambda: str(default_config(q.device)))
    run("fused, pointer loads (no TMA)",
        lambda: fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, scale=scale, use_tma=False), fwd_flop,
        get_mass=lambda r: r[1], get_out=lambda r: r[0], note=lambda: str(default_config(q.device)))
    run("same Triton forward without frame mass",
        lambda: fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, scale=scale, with_mass=False), fwd_flop,
        get_out=lambda r: r[0], note=lambda: str(default_config(q.device)))
    lse_res = run("lse_from_sdpa (the model's attention with LSE)", lambda: fa.lse_from_sdpa(q, k, v, scale),
                  fwd_flop, get_out=lambda r: r[0], note=lambda: select(q, k, v, frame_seq_len=fsl).name)
    if lse_res is not None:
        lse = lse_res[1]
        run("from-LSE kernel alone (given the LSE)",
            lambda: fa.frame_mass_from_lse(q, k, lse, frame_seq_len=fsl, scale=scale), fwd_flop / 2,
            get_mass=lambda r: r, note=lambda: cfg(fa._key_token_tuned))

        def lse_plus_b():
            out, lse2 = fa.lse_from_sdpa(q, k, v, scale)
            return out, fa.frame_mass_from_lse(q, k, lse2, frame_seq_len=fsl, scale=scale)

        run("LSE (SDPA op) + from-LSE kernel", lse_plus_b, fwd_flop * 1.5, get_mass=lambda r: r[1], get_out=lambda r: r[0])
        if not args.skip_reference:
            run("torch blockwise reference (given the LSE)",
                lambda: ref.frame_mass_reference(q, k, frame_seq_len=fsl, scale=scale, lse=lse), fwd_flop / 2,
                get_mass=lambda r: r, reps=max(3, args.reps // 3), warmup=1)

    print(f"\n### Lq = {Lq} ({nqf} frames) x Lk = {Lk} ({nkf} frames), B={B}, H={H}, D={D}, {str(dtype)[6:]}\n")
    print("| path | ms | x SDPA | TFLOP/s | max abs err mass | max abs err out | config / note |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, flop, m_err, o_err, note in rows:
        if ms is None:
            print(f"| {name} | - | - | - | - | - | {note} |")
            continue
        ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
        m = "-" if m_err is None else f"{m_err:.1e}"
        o = "-" if o_err is None else f"{o_err:.1e}"
        print(f"| {name} | {ms:.3f} | {ratio} | {flop / ms / 1e9:.0f} | {m} | {o} | {note} |")
    sys.stdout.flush()


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_frame_attention needs a CUDA GPU (the kernels are tested on CPU by tests/test_kernels.py)")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    from workbench.kernels import frame_attention as fa
    from workbench.kernels import reference as ref

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print("# Frame-aggregated attention benchmark\n")
    print(describe_machine(fa))
    print(f"timing: median of {args.reps} runs after {args.warmup} warm-up runs, CUDA events, no L2 flush")
    for nkf in [int(x) for x in args.key_frames.split(",") if x.strip()]:
        bench_one(fa, ref, args, nkf, dtype)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
