"""Benchmark: the VAE decode on the CPU, reference decoder against the fast one, and what the temporal taps buy.

    python3 bench/bench_vae_cpu.py [--latents 21] [--repeats 2] [--threads N]

The embedded default's VAE (data/embedded/Wan2.1_VAE.pth, float32), random latents of the embedded model's size
(--latents x 16 x 12 x 16 -> 96 x 128 video), decoded on the CPU:
 1. convs: one 3x3x3 convolution per width the embedded VAE has (8, 16, 32 channels at its resolutions) and three
    of the full-size Wan VAE's widths at small frames (96, 192, 384), each as F.conv3d and as three F.conv2d
    temporal taps summed (what models/wan/vae_fast.py runs when TAPS_CHANNELS["cpu"] holds the width);
    milliseconds per call, best of --repeats.
 2. decode: the whole decode (`WanVAE.decode`) and the same latents streamed in chunks of 3 as `generate` pushes
    them, with the reference decoder (diffusers' modules), the fast decoder with the taps off and as set
    (models/wan/vae_fast.py TAPS_CHANNELS["cpu"]: below 64 channels);
    seconds (best of --repeats) and the largest difference from the reference's frames.
Prints a table; numbers are what this machine gives (bench/RESULTS.md records them with machine and date).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models.wan.vae_fast as vae_fast  # noqa: E402
from models.wan.vae import WanVAE  # noqa: E402

VAE_FILE = ROOT / "data" / "embedded" / "Wan2.1_VAE.pth"
# (channels, frames incl. the 2 cached, height and width incl. the conv's zero padding)
CONV_SHAPES = [(8, 6, 98, 130), (16, 6, 50, 66), (32, 5, 26, 34), (96, 5, 62, 106), (192, 5, 32, 54),
               (384, 5, 17, 28)]


def best(fn, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs after one warm-up, seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def section_convs(repeats: int) -> None:
    print("| 3x3x3 conv, input [1, C, T, H, W] -> C | conv3d (ms) | three conv2d taps (ms) | taps / conv3d "
          "| max abs diff |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for c, t, h, w in CONV_SHAPES:
        x = torch.randn(1, c, t, h, w, generator=g).contiguous(memory_format=torch.channels_last_3d)
        wt = torch.randn(c, c, 3, 3, 3, generator=g) / (27 * c) ** 0.5
        taps = [wt[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
        frames = x[0].transpose(0, 1)  # [T, C, H, W]: the frames as a batch of channels-last images
        out = t - 2

        def three():
            return sum(F.conv2d(frames[k:k + out], taps[k]) for k in range(3))  # [T-2, C, H-2, W-2]

        a = F.conv3d(x, wt)[0].transpose(0, 1)
        diff = (three() - a).abs().max().item()
        t3, t2 = best(lambda: F.conv3d(x, wt), repeats), best(three, repeats)
        print(f"| [1, {c}, {t}, {h}, {w}] | {t3 * 1e3:.1f} | {t2 * 1e3:.1f} | {t2 / t3:.2f} | {diff:.1e} |")


def section_decode(n_latents: int, repeats: int) -> None:
    z = torch.randn(1, n_latents, 16, 12, 16, generator=torch.Generator().manual_seed(1))
    saved = vae_fast.TAPS_CHANNELS.get("cpu", range(0))
    rows, ref = [], None
    try:
        for name, decoder, taps in [("reference (diffusers)", "reference", None), ("fast, taps off", "fast", range(0)),
                                    ("fast, taps as set (TAPS_CHANNELS['cpu'])", "fast", saved)]:
            if taps is not None:
                vae_fast.TAPS_CHANNELS["cpu"] = taps
            vae = WanVAE.from_file(VAE_FILE, decoder=decoder)
            video = vae.decode(z)
            ref = video if ref is None else ref

            def streamed():
                s = vae.stream_decoder()
                return torch.cat([s.push(z[:, f:f + 3]) for f in range(0, n_latents, 3)], dim=2)

            same = torch.equal(streamed(), video)
            rows.append((name, best(lambda: vae.decode(z), repeats), best(streamed, repeats),
                         (video - ref).abs().max().item(), same))
    finally:
        vae_fast.TAPS_CHANNELS["cpu"] = saved
    print(f"\n| decoder, {n_latents} latents -> {1 + 4 * (n_latents - 1)} frames of 96x128 | whole decode | "
          "streamed in chunks of 3 | max abs diff from the reference | streamed == whole |")
    print("|---|---|---|---|---|")
    for name, whole, stream, diff, same in rows:
        print(f"| {name} | {whole:.2f} s | {stream:.2f} s | {diff:.1e} | {same} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=21, help="latent frames to decode (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs, the best reported (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.latents < 1 or args.repeats < 1:
        ap.error(f"--latents {args.latents} and --repeats {args.repeats} must both be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_vae_cpu: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with torch.no_grad():
        section_convs(args.repeats)
        section_decode(args.latents, args.repeats)


if __name__ == "__main__":
    main()
