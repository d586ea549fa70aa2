"""Reading weight files safely, hashing them, and writing files atomically: shared by every loader in models/.

Checkpoints are untrusted input. `.pt`/`.pth` files are read with `torch.load(weights_only=True)` (memory
mapped when the format allows); a file that needs arbitrary unpickling is refused with a message naming it,
unless the caller passes `trust_pickle=True`. Writes go to a temporary file in the same folder and are renamed
into place, so a killed process never leaves a half-written file; the file gets the permissions of any new file
(0666 less the umask). `ensure_writable_dir` checks an output folder before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
import stat
import tempfile
from pathlib import Path

from models.errors import CheckpointError, ModelInputError, WeightsMismatchError


def default_memo_dir() -> Path | None:
    """Where `_memo` remembers what whole-file reads found: $WORKBENCH_CACHE, else ~/.cache/sf-workbench; None (read
    every time) where there is no home directory (a container's user with no passwd entry and no HOME)."""
    if os.environ.get("WORKBENCH_CACHE"):
        return Path(os.environ["WORKBENCH_CACHE"])
    try:
        return Path.home() / ".cache" / "sf-workbench"
    except RuntimeError:
        return None


DEFAULT = "default"  # a memo_dir argument's default: `default_memo_dir()`, looked up at the call


LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how a Git LFS pointer file starts


def load_tensors(path, *, trust_pickle: bool = False, verify: bool = True):
    """Whatever a weights file holds (a state dict, or a dict of them), read safely: the file checked whole first
    (`check_weights_file`) and, a torch.save zip, against its CRC-32s (`verify_checksums`; verify=False: the caller
    has just checked them)."""
    import torch  # (here: the file helpers below serve commands that never load a model)

    path = check_weights_file(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from err
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint: neither torch.save's zip format nor a "
                              "pickle (a truncated or corrupt file, or another kind of file)")
    if verify:
        verify_checksums(path)  # (a changed byte would load silently)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise _unpickling_refused(path, err) from err
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise CheckpointError(f"cannot read weights file {str(path)!r}: {type(err2).__name__}: {err2}") from err2
    except Exception as err:
        raise CheckpointError(f"cannot read weights file {str(path)!r}: {type(err).__name__}: {err}") from err


def _looks_like_torch_save(path: Path) -> bool:
    """Whether the file starts as torch.save writes: a zip archive (the format since PyTorch 1.6) or a pickle
    (protocol 2+ opens with 0x80; the legacy format is a pickle too)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def shard_files(index: Path) -> list[Path]:
    """The shard files a `...safetensors.index.json` names (each checked to exist), in name order."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the shard index {str(index)!r}: {type(e).__name__}: {e}") from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"weight shard {str(shard)!r} does not exist (named by {index.name})")
    return shards


def weight_files(path) -> list[Path]:
    """The files that hold the weights `path` names: the shards of a `.index.json`, else the file itself."""
    path = Path(path)
    return shard_files(path) if path.name.endswith(".index.json") else [path]


SMALL_FILE = 1 << 20  # bytes: a file up to this size has its sha256 in its stamp (a config: cheap to hash)


def file_stamps(*paths) -> dict[str, tuple | None]:
    """Each file's (size, mtime, inode, ctime, sha256 of a regular file up to SMALL_FILE bytes else None, whether it
    is a regular file), None for one that is gone; a shard index stands for its shards too, a folder for its
    top-level files (hidden ones left out). Taken before files are hashed for a store's labels and compared after
    they are loaded (`check_unchanged`), they say the bytes loaded are the bytes hashed: a replace changes the
    inode, a rewrite in place the ctime (no tool sets it back, as `cp -p` and `rsync -a` do the mtime)."""
    files = []
    for path in (Path(p) for p in paths if p is not None):
        files += sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")) \
            if path.is_dir() else [path]
        if path.name.endswith(".index.json") and path.is_file():
            files += shard_files(path)
    stamps = {}
    for f in files:
        try:
            st = f.stat()
            regular = stat.S_ISREG(st.st_mode)  # (a pipe is never read here: it would wait for a writer)
            small = sha256_file(f, memo_dir=None) if regular and st.st_size <= SMALL_FILE else None
            stamps[str(f)] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, small, regular)
        except OSError:
            stamps[str(f)] = None
    return stamps


def changed_files(stamps: dict[str, tuple | None]) -> list[str]:
    """The files of `file_stamps` whose bytes may have changed since: gone, or of another size, mtime or inode. A
    file whose ctime alone moved (chmod, a hard link, `touch -a`, a backup keeping atimes: its metadata) is one of
    them unless its sha256 now is the one it had as stamped: a small file's, in its stamp, a large one's as
    `sha256_file` remembered it for those stamps (a large file never hashed then counts as changed)."""
    now = file_stamps(*stamps)
    changed = []
    for path, stamp in stamps.items():
        new = now.get(path)
        if new == stamp:
            continue
        if stamp is not None and new is not None and new[:3] == stamp[:3] and new[5] and stamp[5]:
            before = stamp[4]
            if before is None and (memo_dir := default_memo_dir()) is not None:
                before = _read_memo(memo_dir / "file_hashes.json").get(_memo_key(Path(path), "sha256", stamp[:4]))
            if before is not None and before == (new[4] or sha256_file(path)):
                continue
        changed.append(path)
    return changed


def check_unchanged(stamps: dict[str, tuple | None], what: str) -> None:
    """CheckpointError naming the files of `file_stamps` that changed since (`changed_files`; `what`: what the run
    was doing)."""
    changed = changed_files(stamps)
    if changed:
        shown = ", ".join(repr(p) for p in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise CheckpointError(f"{shown} changed {what} (replaced or rewritten: a training run saving into that "
                              "folder, a copy still running?), so the weights loaded may not be those hashed for the "
                              "labels; no result was written: run again once the files are final")


def weights_sha256(path) -> str:
    """The sha256 that identifies the weights a file holds: the file's own, or for a shard index a hash over the
    index and every shard it names (name and sha256), so that a changed shard is a changed model."""
    path = Path(path)
    if not path.name.endswith(".index.json"):
        return sha256_file(path)
    h = hashlib.sha256(f"shards\0index={sha256_file(path)}\0".encode())
    for shard in shard_files(path):
        h.update(f"{shard.name}={sha256_file(shard)}\0".encode())
    return h.hexdigest()


def load_state_dict_file(path, trust_pickle: bool = False) -> dict:
    """A flat {name: tensor} state dict from .safetensors or .pth/.pt, read safely; a `.index.json` (sharded
    safetensors, as transformers and diffusers save large models) gives the union of its shards."""
    import torch

    if Path(path).name.endswith(".index.json"):
        merged = {}
        for shard in shard_files(path):
            merged.update(load_state_dict_file(shard, trust_pickle=trust_pickle))
        return merged
    sd = load_tensors(path, trust_pickle=trust_pickle)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        top = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise CheckpointError(f"{path} is not a flat {{name: tensor}} state dict (top level: {top})")
    return dict(sd)


def check_tensor_shapes(expected: dict, state_dict: dict, what: str) -> None:
    """The one state-dict check of every loader: refuse missing, unexpected and wrongly shaped tensors, listing
    them all (the first 12 of each kind). expected {name: shape}; state_dict {name: tensor}; CheckpointError
    "{what} (missing: ...; unexpected: ...; wrong shape: ...)" otherwise."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k}: {tuple(state_dict[k].shape)} != {tuple(expected[k])}"
                   for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{name}: {shown}")
        raise WeightsMismatchError(f"{what} ({'; '.join(parts)})")


def _memo(path: Path, kind: str, memo_dir: Path | None | str, compute, keep=lambda value: True):
    """compute(), remembered in memo_dir/file_hashes.json (DEFAULT: `default_memo_dir()`; None: not remembered):
    what a read of a whole file found (its sha256, its checksums checked) is worked out once per machine, not per
    run (an 11 GB file). The key is (kind, real path, size, mtime, inode, ctime): `cp -p`, `rsync -a` and `tar x`
    give a replaced file its old size and mtime, and a store then took samples of other weights under the old
    sha256; no tool sets a ctime. A value `keep` refuses (a failed check) is not remembered: a file copied again is
    read again. Several processes update the file under a lock, each adding its key to what is there (they lost
    each other's keys)."""
    memo_dir = default_memo_dir() if memo_dir == DEFAULT else memo_dir
    st = path.stat()
    key = _memo_key(path, kind, (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    memo_file = Path(memo_dir) / "file_hashes.json" if memo_dir is not None else None
    if memo_file is not None and key in (memo := _read_memo(memo_file)):
        return memo[key]
    value = compute()
    if memo_file is not None and keep(value):
        try:
            from filelock import FileLock, Timeout

            with FileLock(str(memo_file) + ".lock", timeout=10):
                memo = _read_memo(memo_file)
                memo[key] = value
                atomic_write_bytes(memo_file, json.dumps(memo, indent=1, sort_keys=True).encode())
        except (OSError, Timeout):  # an unwritable or busy cache only costs a re-read next time
            pass
    return value


def _memo_key(path: Path, kind: str, stamp: tuple) -> str:
    """The memo's key of a file of `stamp` (size, mtime, inode, ctime: `file_stamps`' order)."""
    size, mtime, inode, ctime = stamp
    return f"{'' if kind == 'sha256' else kind + '|'}{os.path.realpath(path)}|{size}|{mtime}|{inode}|{ctime}"


def _read_memo(memo_file: Path) -> dict:
    """The remembered values; {} for a missing, unreadable or damaged file (a truncated one, or JSON that is no
    object: `null` made every run fail), which the next write replaces."""
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def sha256_file(path, memo_dir: Path | None | str = DEFAULT) -> str:
    """sha256 of a file's bytes; remembered by (real path, size, mtime, inode, ctime) in memo_dir, so an 11 GB file is
    hashed once per machine."""
    path = Path(path)

    def digest():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        return h.hexdigest()

    return _memo(path, "sha256", memo_dir, digest)


def verify_checksums(path, memo_dir: Path | None | str = DEFAULT) -> None:
    """torch.save writes a zip whose every record carries a CRC-32, and torch.load does not check them: a file whose
    bytes changed after it was written (a bad disk or copy) loads, and its weights are silently wrong. Read once
    against its checksums (about 1 GB/s; remembered per file as `sha256_file` is, memo_dir None: read every time);
    a CheckpointError names the bad record. Files that are not zips pass (their loaders say what they are)."""
    import zipfile

    path = Path(path)

    def bad_record():
        try:
            with zipfile.ZipFile(path) as z:
                return z.testzip()
        except zipfile.BadZipFile:
            return None

    bad = _memo(path, "zip-crc", memo_dir, bad_record, keep=lambda bad: bad is None)
    if bad is not None:  # (records are named FOLDER/data/N, FOLDER the name torch.save wrote it under)
        raise CheckpointError(f"{str(path)!r} is corrupt: its record {bad.split('/', 1)[-1]!r} does not match the "
                              "checksum written with it (the file changed after it was saved: copy or download it "
                              "again)")


def _unpickling_refused(path, err: Exception) -> CheckpointError:
    """The refusal of a file whose unpickling could run code, naming what it would call."""
    m = (re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", str(err), re.S)  # (what was blocked, in
         or re.search(r"(Trying to load unsupported GLOBAL [^\n]*?)\.?\n", str(err)))  # torch's two wordings)
    detail = " ".join(m.group(1).split()) if m else str(err).splitlines()[0]
    return CheckpointError(f"{str(path)!r} needs arbitrary unpickling, which can run code ({detail}). Load it only if "
                           "you trust its source, with --trust-pickle (trust_pickle=True)")


def check_unpickling(path) -> None:
    """Refuse, before any work, a torch.save file whose unpickling could run code (or that is no torch file): it is
    read as `load_tensors` reads it, without the checksum pass, so its tensors are memory-mapped, not read (cheap for
    a file of any size; a legacy non-zip file is read whole). A safetensors file holds no pickle."""
    if Path(path).suffix != ".safetensors":
        load_tensors(path, verify=False)


def check_weights_file(path, what: str) -> Path:
    """A weights file that can be opened, said before any work (cheap: no tensor is read): it exists, is not a Git
    LFS pointer, and its container is whole: torch.save's zip still has its central directory, at its end (a
    truncated file has lost it), and a safetensors file is as long as its header says. Returns the path."""
    import zipfile

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} is a broken link (to {os.readlink(path)!r}, which does not "
                              "exist; in a Hugging Face cache: its blob is gone): download the file again")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(max(8, len(LFS_POINTER)))
    if head.startswith(LFS_POINTER):
        raise CheckpointError(f"{what} {str(path)!r} is a Git LFS pointer ({path.stat().st_size} bytes), not the "
                              "weights: fetch the file itself (git lfs pull, or download it again)")
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        n = int.from_bytes(head[:8], "little")
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n)) if 8 + n <= size else None
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, AttributeError):
            header, end = None, 0
        if header is None or 8 + n + end > size:
            raise CheckpointError(f"{what} {str(path)!r} is not a whole safetensors file ({size} bytes: its header "
                                  "is unreadable or promises more data than the file holds; truncated, damaged or "
                                  "another kind of file): copy or download it again")
    elif head[:2] == b"PK":  # torch.save's zip
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile:
            raise CheckpointError(f"{what} {str(path)!r} is a truncated or damaged zip ({size} bytes; torch.save "
                                  "writes one): copy or download it again") from None
    return path


def ensure_writable_dir(path) -> Path:
    """Create the folder `path` if needed and check that a file can be written in it; ModelInputError naming
    the folder otherwise."""
    return check_writable_dir(path, create=True)


def check_writable_dir(path, *, create: bool = False) -> Path:
    """Check that the folder `path` can be written, by writing a file (as root, permission bits alone prove
    nothing). Without `create` nothing is made: the nearest existing ancestor must be a folder that takes a file.
    ModelInputError naming `path` otherwise (and, when `path` is yet to be made, the folder that refused it)."""
    path = Path(path)
    base = path
    if path.exists() and not path.is_dir():
        raise ModelInputError(f"output folder {str(path)!r} is a file, not a folder; give a folder's path (new or "
                              "existing)")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        while not base.exists() and base != base.parent:
            base = base.parent
        if not base.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(base))
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        made_in = next((p for p in path.parents if p.exists()), None) if not path.exists() else None
        where = ("" if made_in is None else f" (it would be made in {str(made_in)!r}, which takes no new files)"
                 if made_in.is_dir() else f" ({str(made_in)!r}, on its way, is a file)")
        raise ModelInputError(f"output folder {str(path)!r} is not writable{where}: {e.strerror or e}") from e
    return path


def check_writable_tree(path) -> Path:
    """Check that every folder inside the existing folder `path` (a store or an output folder a run appends to)
    takes new files: a folder another user made without group write (umask 022), a `chmod g+w` without -R, or a
    read-only mount would otherwise fail the first append after the model work. os.access counts a read-only
    file system and, for root, nothing else. ModelInputError naming the first such folders otherwise."""
    path = Path(path)
    if not path.is_dir():
        return path
    bad = [str(d) for d, _, _ in os.walk(path) if not os.access(d, os.W_OK | os.X_OK)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ModelInputError(
            f"output folder {str(path)!r} is not writable inside: {', '.join(repr(b) for b in bad[:3])}{more} "
            f"cannot take new files; its owner can make it so (chmod -R g+w {str(path)!r}), or choose another --out")
    return path


def temporary_path(path) -> Path:
    """A fresh temporary path beside `path` (hidden, unique per process and call, same suffix), not created: the
    writer creates it, so it gets the permissions of any new file rather than mkstemp's 0600."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


TEMPORARY_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp")  # the names temporary_path makes; group 1: the pid


def new_file_mode() -> int:
    """The permission bits a new file gets here: 0o666 less the process's umask (read from /proc on Linux, so that
    no other thread sees the umask changed for a moment)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


STALE_AFTER_S = 600  # a temporary file untouched this long, of a process gone, was left by a killed write


def stale_temporaries(folder, *, now: float | None = None, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Temporary files of atomic writes (`temporary_path`'s names: .NAME.PID-HEX.tmpSUFFIX) under `folder`, left by a
    write that was killed: their process is gone from this host and they have not changed for `older_than_s`
    seconds (a writer on another host sharing the folder keeps its file changing, so it is never taken; a caller
    that holds the folder's lock knows there is no other writer and passes 0)."""
    import time

    now = time.time() if now is None else now
    stale = []
    for path in Path(folder).rglob(".*.tmp*"):
        m = TEMPORARY_NAME.match(path.name)
        if not m or not path.is_file() or now - path.stat().st_mtime < older_than_s:
            continue
        try:
            os.kill(int(m.group(1)), 0)  # the writer still runs (or a process has its pid): keep the file
        except ProcessLookupError:
            stale.append(path)
        except (PermissionError, OverflowError):
            pass
    return sorted(stale)


def relative_note(path) -> str:
    """What a "does not exist" error adds for a relative path: the folder it was read from."""
    return "" if Path(path).is_absolute() else f" (a relative path: read from the current folder, {os.getcwd()})"


def atomic_write(path, write) -> None:
    """Call write(tmp_path) on a temporary path beside `path`, then rename it into place, with the permissions of
    any new file (some writers, safetensors' among them, create theirs owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(str(tmp))
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save`, with the metadata keys of the header in sorted order: the library writes them in
    the order of a hash map, which changes from process to process, so two runs storing the same values gave
    files of other bytes (and sha256). Tensors, offsets and values are the library's."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # (the data starts 8-aligned, as the library pads it)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path) -> None:
    """torch.save, atomically (checkpoints, legacy files, caches), through a Python file: so the archive's records
    are named archive/... whatever the temporary file is called (the same values give the same bytes; a path gave
    each save the temporary name's records), and a write that fails (a full disk, a file size limit) is the
    OSError that stopped it, naming `path`, where torch's zip writer reports a RuntimeError of its own."""
    import torch

    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    try:
        atomic_write(path, save)
    except RuntimeError as e:
        cause = e.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e
        raise
    except OSError as e:  # (the last buffered write, when the file closes)
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
