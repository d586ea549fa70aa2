"""Do two CUDA graphs replayed at the same time on two streams disturb each other's GEMMs when both were recorded
on one capture stream? The check behind models/common/graph_streams.py.

PyTorch keeps cuBLAS's workspace per (handle, stream), and a GEMM recorded in a CUDA graph uses the workspace of
the stream it was recorded on at every replay. `workbench generate` replays the rollout's graphs and the fast VAE
decoder's graphs at the same time (the decode beside the next chunk's denoising); recorded on PyTorch's one default
capture stream, their GEMMs would share one workspace. This script records two graphs of GEMMs at those shapes:

    A, the DiT's:      x [4680, 1536] -> q, k, v, o projections (1536 x 1536), the FFN up with its GELU epilogue
                       (1536 x 8960) and down (8960 x 1536), bf16 (the 1.3B model's GEMMs of one chunk, one layer)
    B, the decoder's:  x [6240, 384] -> the mid-block attention's qkv (384 x 1152) and output (384 x 384)

each repeated `--layers` times in its graph, either both on the default capture stream (`--capture shared`, what
the code did before) or each on a stream of its own (`--capture own`, what it does now). Then it replays them
alone (the reference outputs), and `--rounds` times at the same time, A on the current stream and B on a side
stream, comparing every output with its reference bitwise. A run that stops making progress for `--watchdog`
seconds is taken as hung: every thread's stack is printed ("Timeout") and the process exits with status 1.
The `own` run is the control: GEMMs that differ there too would be nondeterministic by themselves.

Result so far (H200, torch 2.11+cu130, 2026-12-04, bench/RESULTS.md session 25): both modes 300 rounds, no
mismatch, no hang; so at these shapes this cuBLAS shows no interference, and the pipeline's hang of session 24 is
not explained by it.

    python3 bench/bench_graph_streams.py --capture own
    python3 bench/bench_graph_streams.py --capture shared

Prints one line per run: mode, rounds, mismatching rounds of A and of B, seconds; exits 1 on a mismatch. Needs
CUDA.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import torch


def dit_layers(x, ws, layers):
    """The DiT GEMMs of `layers` blocks on x [L, 1536] (bf16): q, k, v, o, FFN up (GELU epilogue), down."""
    q, k, v, o, up_w, up_b, down = ws
    h = x
    for _ in range(layers):
        a = torch.nn.functional.linear(h, q) + torch.nn.functional.linear(h, k) + torch.nn.functional.linear(h, v)
        h = torch.nn.functional.linear(a, o)
        f = torch._addmm_activation(up_b, h, up_w.t(), use_gelu=True)  # [L, 8960]
        h = torch.nn.functional.linear(f, down) * 0.01
    return h


def vae_layers(x, ws, layers):
    """The decoder mid-block attention's GEMMs on x [L, 384]: qkv (384 -> 1152), output (384 -> 384)."""
    qkv, out = ws
    h = x
    for _ in range(layers):
        t = torch.nn.functional.linear(h, qkv)  # [L, 1152]
        h = torch.nn.functional.linear(t[:, :384] + t[:, 384:768] + t[:, 768:], out) * 0.05
    return h


def record(fn, args, pool, stream):
    """A CUDA graph of fn(*args) recorded on `stream` (None: PyTorch's default capture stream); returns (graph, out)."""
    fn(*args)  # warm-up outside the graph: cuBLAS picks and loads its kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn(*args)
    return graph, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capture", choices=("own", "shared"), required=True,
                    help="own: each graph on a capture stream of its own; shared: both on PyTorch's default one")
    ap.add_argument("--rounds", type=int, default=300, help="concurrent replays (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=6, help="GEMM groups per graph (default: %(default)s)")
    ap.add_argument("--watchdog", type=float, default=120.0, help="seconds without progress taken as a hang")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("this check needs a CUDA GPU", file=sys.stderr)
        return 2
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=0.02: (torch.randn(*s, generator=g, device=dev) * scale).to(bf)  # noqa: E731
    xa, xb = rnd(4680, 1536, scale=1.0), rnd(6240, 384, scale=1.0)
    wa = (rnd(1536, 1536), rnd(1536, 1536), rnd(1536, 1536), rnd(1536, 1536), rnd(8960, 1536), rnd(8960),
          rnd(1536, 8960))
    wb = (rnd(1152, 384), rnd(384, 384))
    side = torch.cuda.Stream()
    own = args.capture == "own"
    graph_a, out_a = record(dit_layers, (xa, wa, args.layers), torch.cuda.graph_pool_handle(),
                            torch.cuda.Stream() if own else None)
    with torch.cuda.stream(side):
        graph_b, out_b = record(vae_layers, (xb, wb, args.layers), torch.cuda.graph_pool_handle(),
                                torch.cuda.Stream() if own else None)
    torch.cuda.synchronize()
    graph_a.replay()
    torch.cuda.synchronize()
    ref_a = out_a.clone()
    with torch.cuda.stream(side):
        graph_b.replay()
    torch.cuda.synchronize()
    ref_b = out_b.clone()
    bad_a = bad_b = 0
    t0 = time.perf_counter()
    for r in range(args.rounds):
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
        main_stream = torch.cuda.current_stream()
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            for _ in range(3):  # B replays three times while A replays once: they overlap throughout
                graph_b.replay()
        graph_a.replay()
        main_stream.wait_stream(side)
        torch.cuda.synchronize()
        bad_a += not torch.equal(out_a, ref_a)
        bad_b += not torch.equal(out_b, ref_b)
    faulthandler.cancel_dump_traceback_later()
    print(f"capture {args.capture}: {args.rounds} rounds, A differs in {bad_a}, B differs in {bad_b}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0 if bad_a == bad_b == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
