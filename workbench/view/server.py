"""The viewer's HTTP server: Python's standard library only, serving the page in static/ and JSON from a Source.

    GET /                                   the page (static/index.html; its script and style under /static/)
    GET /api/meta                           samples, layers, heads, steps, frame counts, pixel_to_latent [T]
    GET /api/state?sample=ID                chunks made so far (labels, query frames, pixel range), frames_ready,
                                            video_error, make_video (the generate command of a missing video)
    GET /api/attn?sample=ID&layer=L&step=S  attn_mass [head][query_frame][key_frame] (null: NaN) and vmax, its
                                            largest value over every head and chunk: one colour scale for the video
    GET /api/frame?sample=ID&t=T            pixel frame T as a JPEG

Bad parameters answer 400 with {"error": "..."} naming the value and what is allowed; a frame not made yet, 404;
anything else that fails, 500 with the error (and its traceback on the terminal). Started before its source
exists (`workbench view --wait`), /api/meta answers {"waiting": PATH} until the source is set.
The page polls /api/state while a live stream runs. Bound to 127.0.0.1 unless told otherwise: it serves files of
the user's runs, so reach it from another machine through an SSH tunnel rather than an open port.
"""

from __future__ import annotations

import io
import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

import numpy as np

from workbench.errors import WorkbenchError
from workbench.store_guard import StoreChanged
from workbench.view.sources import Source

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}


def _nested(values: np.ndarray):
    """float array -> nested lists with None for NaN, 6 significant digits (JSON has no NaN)."""
    if values.ndim == 0:
        v = float(values)
        return None if math.isnan(v) else float(f"{v:.6g}")
    return [_nested(v) for v in values]


def attn_payload(source: Source, sample: str, layer, step) -> dict:
    values = source.attn(sample, layer, step)  # [head, query_frame, key_frame]
    finite = values[np.isfinite(values)]
    return dict(sample=sample, layer=int(layer), step=int(step), heads=source.heads,
                vmax=float(finite.max()) if finite.size else None, values=_nested(values),
                not_finite=not_finite_rows(source, sample, values, step))


def not_finite_rows(source: Source, sample: str, values: np.ndarray, step) -> list[int]:
    """The query frames of chunks made so far whose row is NaN for every head: not "not attended" (every query frame
    attends at least its own chunk) but attention that was not finite (a rollout whose activations overflowed).
    An image-to-video run's frame 0 has a context pass only: its rows are NaN at the denoising steps by design."""
    made = [int(f) for c in source.state(sample)["chunks"] for f in c["query_frames"]]
    phase = next((s.get("phase") for s in source.steps if int(s["step"]) == int(step)), None)
    if source.image and phase != "context":
        made = [f for f in made if f != 0]
    return [f for f in made if bool(np.isnan(values[:, f, :]).all())]


def jpeg(frame: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or localhost."""
    import ipaddress

    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, source: Source | None, host: str = "127.0.0.1", port: int = 8765, waiting_for: str = ""):
        self.source = source  # None until what `waiting_for` names exists (then set by the caller)
        self.waiting_for = waiting_for
        self.lock = threading.Lock()  # sources cache decoded videos and chunk files: one request at a time reads
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: ViewerServer

    def log_message(self, format, *args):  # quiet: the terminal shows the URL and errors only
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a live stream changes under the same URLs
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json")

    def do_GET(self):  # noqa: N802 (the standard library's name)
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if not self._host_allowed():
            return self._json({"error": f"the viewer serves this machine's own names only (127.0.0.1, localhost), "
                                        f"not Host {self.headers.get('Host')!r}: to serve others, start it with "
                                        "--host 0.0.0.0 (every interface) or this machine's address"},
                              HTTPStatus.FORBIDDEN)
        try:
            if url.path == "/favicon.ico":
                return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            if url.path in ("/", "/index.html"):
                return self._static("index.html")
            if url.path.startswith("/static/"):
                return self._static(url.path[len("/static/"):])
            if url.path.startswith("/api/"):
                return self._api(url.path[len("/api/"):], query)
            self._json({"error": f"no page {url.path!r}; the viewer is at /"}, HTTPStatus.NOT_FOUND)
        except StoreChanged as err:  # another run replaced or cut the store the page shows
            self._json({"error": f"{err} (stop this `workbench view` and start it again)"}, HTTPStatus.CONFLICT)
        except WorkbenchError as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):  # the page went away mid-answer
            pass
        except Exception as err:  # a bug or an unreadable file: said on the page and on the terminal
            import traceback

            traceback.print_exc()
            self._json({"error": f"the viewer failed to answer {url.path}: {type(err).__name__}: {err}"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _host_allowed(self) -> bool:
        """A viewer bound to a loopback address answers requests addressed to a loopback name only: a web page of
        another site whose name a DNS rebinding points at 127.0.0.1 would otherwise read its /api/ answers."""
        if not _loopback(str(self.server.server_address[0])):
            return True  # (--host 0.0.0.0 or a named interface: served to whatever name reaches it)
        if "Host" not in self.headers:
            return True  # (an HTTP/1.0 client: browsers, whose pages a rebinding would use, always send one)
        host = (urlparse(f"//{self.headers['Host']}").hostname or "").rstrip(".")
        return _loopback(host)

    def _static(self, name: str) -> None:
        path = resources.files("workbench.view") / "static" / name
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        if "/" in name or suffix not in STATIC_TYPES or not path.is_file():
            return self._json({"error": f"no static file {name!r}"}, HTTPStatus.NOT_FOUND)
        self._send(200, path.read_bytes(), STATIC_TYPES[suffix])

    def _api(self, name: str, q: dict) -> None:
        source = self.server.source

        def need(key):
            if key not in q:
                raise WorkbenchError(f"/api/{name} needs the parameter {key!r}")
            return q[key]

        takes = {"meta": (), "state": ("sample",), "attn": ("sample", "layer", "step"), "frame": ("sample", "t")}
        if name in takes and (unknown := sorted(set(q) - set(takes[name]))):  # (e.g. stat=: the viewer shows attn_mass)
            raise WorkbenchError(f"/api/{name} takes {', '.join(takes[name]) or 'no parameter'}, not {unknown}"
                                 + (" (it serves attn_mass)" if name == "attn" else ""))
        if source is None:  # --wait: the run has not started writing yet
            if name == "meta":
                return self._json({"waiting": self.server.waiting_for})
            raise WorkbenchError(f"nothing to show yet: waiting for {self.server.waiting_for}")
        with self.server.lock:
            if name == "meta":
                return self._json(source.meta())
            if name == "state":
                return self._json(source.state(need("sample")))
            if name == "attn":
                return self._json(attn_payload(source, need("sample"), need("layer"), need("step")))
            if name == "frame":
                frame = source.frame(need("sample"), need("t"))
                if frame is None:
                    return self._json({"error": f"pixel frame {q['t']} of {q['sample']} is not there (yet)"},
                                      HTTPStatus.NOT_FOUND)
                body = jpeg(frame)
            else:
                return self._json({"error": f"no endpoint /api/{name}; use meta, state, attn or frame"},
                                  HTTPStatus.NOT_FOUND)
        self._send(200, body, "image/jpeg")


def start(source: Source, host: str = "127.0.0.1", port: int = 8765) -> tuple[ViewerServer, threading.Thread]:
    """Serve in a background thread (port 0: any free port; the server's `url` says which)."""
    server = ViewerServer(source, host, port)
    thread = threading.Thread(target=server.serve_forever, name="workbench-view", daemon=True)
    thread.start()
    return server, thread
