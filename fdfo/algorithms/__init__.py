"""Training algorithms beside FDFO (docs/algorithm.md §11), one module each, holding only what differs: the
objective and, where the method has one, its own sampler step. FDFO's own math stays in `fdfo.objective` and
`fdfo.sampling`. Everything here is a pure tensor function that a test can call directly."""
