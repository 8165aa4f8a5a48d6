"""The LoLA core: pure functions over a pytree state (docs/semantics.md for the equations).

Modules:
  config:     LoLAConfig, the static hyper-parameters of one layer.
  state:      LoLAState, init_state, cached_positions.
  selection:  the sparse-cache policies and the end-of-chunk cache update.
  scan:       lola_prefill (the chunked scan), lola_decode (one token), lola_end_chunk (a
              deferred chunk end) and lola_decode_steps (a jitted loop of decode steps).
  key_features: recomputing the window's phi_k (LoLAConfig.window_features="recomputed").
  reference:  lola_reference, a float64 NumPy twin, token by token (tests only).
  validation: input checks shared by the entry points.
  compiler:   the XLA compiler options of the jitted decode programs (decode_jit).

The formulas the core shares with the kernels (the mix, the self-recall error, the XLA chunk
step) live below it in `pallas_kernels` (`equations`, `lola_chunk.xla`). The public names are
re-exported by `lola_jax`.
"""
