"""Training algorithms beside FDFO (docs/algorithm.md §11), one module each, holding only what differs: the
objective and, where the method has one, its own sampler step. FDFO's own math stays in `fdfo.objective` and
`fdfo.sampling`. The method modules are pure tensor functions that a test can call directly; `groups` holds the
epoch phases both baselines share (G samples per prompt, their training items and micro-batch), `ema` the EMA (and
DiffusionNFT's old) adapter copies, `dpm_solver` DiffusionNFT's rollout solver."""
