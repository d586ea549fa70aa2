"""`workbench view`: a local web page that plays a video beside its attention, chunk by chunk.

    store (+ its mp4)  ----\\
                            >-- sources.py (one reading interface) --> server.py (stdlib HTTP, JSON) --> static/
    generate --live OUT ---/      frames <-> latent frames <-> chunks      /api/meta, /api/attn, /api/frame

`stream.py` is the only place that knows the live stream folder that `workbench generate --live` writes;
`sources.py` reads it, or a store (docs/store.md) and the video generate wrote for each sample; `server.py`
serves the page in `static/` (plain HTML/JS, no build step) and the JSON it fetches. docs/view.md has the user's
side.
"""
