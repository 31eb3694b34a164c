"""copsd's Triton kernels, installed as ``copsd_kernels`` (the bare name ``kernels`` belongs to
another PyPI project).  One op per module; modules are imported on demand by
``copsd.backends.triton`` so that a problem in one op never hides the others.

* ``linear_logprobs``   -- lm_head log-probs/entropy/LSE statistics and the dense gradient tile
* ``linear_divergence`` -- student+teacher tiles on chip: divergence statistics and gradient tile
* ``linear_topk``       -- running top-k per vocabulary split + LSE
* ``linear_rows``       -- row kernels of the chunked path (cuBLAS logits chunk -> per-row stats, dZ)
* ``_common``           -- GEMM mainloop producing a logits tile, logit transform, heuristics
"""
