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
