"""copsd's Triton kernels, installed as ``copsd_kernels`` (the bare name ``kernels`` belongs to
another PyPI project).  One op per module; each is imported on demand by its host module
(``copsd.backends._triton_<op>``, chosen by ``copsd.backends.triton``) so that a problem in one op never hides
the others.

* ``linear_logprobs``   -- lm_head log-probs/entropy/LSE statistics and the dense gradient tile
* ``linear_divergence`` -- student+teacher tiles on chip: divergence statistics and gradient tile
* ``linear_topk``       -- running top-k per vocabulary split + LSE
* ``linear_rows``       -- row kernels of the chunked path (cuBLAS logits chunk -> per-row stats, dZ)
* ``_common``           -- GEMM mainloop producing a logits tile, logit transform, heuristics
* ``merge_attention_states``, ``shared_prefix_attention`` -- cascade attention (forward)
"""

import os


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run in Triton's interpreter (NumPy, CPU tensors) with tiny tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
