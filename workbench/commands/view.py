"""`workbench view`: serve the local page that plays a video beside its attention (workbench/view/)."""

from __future__ import annotations

import argparse
import errno

HELP = "play a video beside its per-head attention maps in a local web page (a store + its mp4, or a live run)"

EPILOG = """\
examples:
  workbench extract --layers 0-5 --seed 0 --out runs/x.zarr && workbench generate --seed 0 --out runs/x
  workbench view runs/x.zarr                        # finds runs/x/p0000-s0.mp4 (generate's name for the sample)
  workbench view runs/x.zarr --video runs/x/p0000-s0.mp4
  workbench view runs/sf.zarr --video videos/sf      # a folder of generate outputs: pPPPP-sS.mp4 per sample
  workbench generate --prompt "a green square moving right" --live --layers 0-5 --out runs/live &  # meanwhile:
  workbench view runs/live --wait                   # waits for generate to start writing
  workbench intervene --knockout 0-2 --capture 0-5 --save-videos --out runs/fx.zarr
  workbench view runs/fx.zarr                       # each entry's attention (and the baseline's) beside its video

The page (http://127.0.0.1:8765/ by default) plays the pixel frames; beside them, one map per head of the
current chunk's query frames x key frames (attn_mass, docs/store.md), with layer, head, step and sample
selectors and one colour scale for the whole video. Pixel frame t shows latent frame ceil(t/4) (the Wan VAE:
a causal first frame, then 4 frames per latent frame: 21 latent frames -> 81 pixel frames); chunks are the
store's query_chunk labels. On a remote GPU machine: ssh -L 8765:127.0.0.1:8765 HOST, then open the URL here.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("view", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="STORE_OR_FOLDER",
                   help="a store (.zarr from extract) or the --out folder of `workbench generate --live`")
    p.add_argument("--video", metavar="MP4_OR_FOLDER",
                   help="the store's video (an mp4), or a folder of generate outputs (pPPPP-sS.mp4 per sample); "
                        "default: STORE.mp4, or pPPPP-sS.mp4 beside the store or in the folder named like it")
    p.add_argument("--sample", metavar="ID", help="which sample --video shows, when the store holds several")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--wait", action="store_true",
                   help="if STORE_OR_FOLDER is not there yet, wait for `workbench generate --live` to start writing it")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=run)


def run(args) -> int:
    import threading
    import time
    from pathlib import Path

    from workbench.errors import WorkbenchError
    from workbench.inputs import find_store
    from workbench.progress import shell_word
    from workbench.store import named
    from workbench.view.server import ViewerServer
    from workbench.view.sources import open_source, videos_folder
    from workbench.view.stream import MANIFEST

    if not 0 <= args.port <= 65535:
        raise WorkbenchError(f"--port {args.port}: give a port in 0..65535 (0: any free one)")
    path = find_store(args.path)  # (a store above the working directory too, as report finds it)
    if path != Path(args.path):
        print(f"opened {path}", flush=True)
    args.path = str(path)
    ready = lambda: (path / MANIFEST).is_file() or (path / "zarr.json").is_file()  # noqa: E731
    waiting = args.wait and not ready()
    source = None if waiting else open_source(args.path, video=args.video, sample=args.sample)
    try:  # bound before any wait, so that the page answers (and says it waits) from the start
        server = ViewerServer(source, args.host, args.port, waiting_for=str(path / MANIFEST))
    except OSError as err:
        how = ("choose another --port (0: any free one)" if err.errno == errno.EADDRINUSE else
               "choose another --host (this machine's names and addresses: 127.0.0.1, 0.0.0.0 for every interface)")
        raise WorkbenchError(f"cannot serve on {args.host}:{args.port} ({err.strerror or err}); {how}") from None
    thread = threading.Thread(target=server.serve_forever, name="workbench-view", daemon=True)
    thread.start()
    try:
        if waiting:
            print(f"waiting for {path / MANIFEST} (`workbench generate --live --out {shell_word(path)}`); the page at "
                  f"{server.url} says so until it is there; Ctrl-C stops", flush=True)
            while not ready():
                time.sleep(0.5)
            server.source = open_source(args.path, video=args.video, sample=args.sample)
        source = server.source
        videos = getattr(source, "videos", None)
        what = f"{len(videos)} video(s)" if videos is not None else "a live stream"
        print(f"serving {args.path} ({what}) at {server.url}  (Ctrl-C stops)", flush=True)
        for sample, why in getattr(source, "video_errors", {}).items():  # videos of another run, left out
            print(f"note: {sample} is shown without its video: {why}", flush=True)
        ds = getattr(source, "ds", None)
        if videos == {} and not getattr(source, "video_errors", None) and args.video is None and ds is not None \
                and "intervention" not in ds.dims:  # (where they were looked for, and how one is made)
            first = str(ds["sample"].values[0])
            folder = videos_folder(named(path))  # (`view .` inside the store: its name)
            print(f"note: no video of its samples was found ({shell_word(folder / (first + '.mp4'))}, or beside the "
                  f"store); `{source.make_video(first)}` makes {first}'s with the store's model and settings "
                  "(another --seed, the others'); --video PATH names one", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(server.url)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        return 130 if server.source is None else 0
    finally:
        server.shutdown()
        server.server_close()
    return 0
