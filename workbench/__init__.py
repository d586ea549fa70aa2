"""The workbench: hooks on the models' attention entry point, exact reductions, labelled stores, the CLI.

    workbench.hooks       probes that subscribe to attention calls (by layer, kind, step, chunk, head)
    workbench.interventions  edits of the calls they select (q, k, v, key frame mask, heads' outputs)
    workbench.statistics  the statistics registry: every store variable defined once
    workbench.reductions  exact statistics of one call (attn_mass, attn_logit, cross_mass, key-token maps, ...)
    workbench.capture     the statistics probe that fills the store's layout during a rollout
    workbench.store       the zarr/xarray store (layout in docs/store.md): open, write, resume
    workbench.extract     `workbench extract`: rollouts with capture, written sample by sample
"""

__version__ = "0.1.0"


def git_commit() -> str:
    """The commit of this code's git checkout ("-dirty" with uncommitted changes), "unknown" for an install that
    is not a checkout of its own (what stores record as `git_commit`, and `workbench --version` prints)."""
    import subprocess
    from pathlib import Path

    try:
        root = Path(__file__).resolve().parents[1]
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:  # (an install inside another repository:
            return "unknown"  # its commit says nothing of this code)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else "unknown"
    except Exception:
        return "unknown"
