"""Every Triton kernel copsd launches compiles for an H100 (sm_90), also on machines without a GPU.

The interpreter the other CPU tests use never lowers a kernel, so a kernel can pass all of them and
still be rejected by the GPU compiler (or need more shared memory than an H100 has).  This runs
``benchmarks/triton_sm90.py`` in a subprocess without ``TRITON_INTERPRET``: it records the launches
the backend makes at the GPU block sizes and compiles a covering subset of them with Triton's
bundled ptxas.  Register counts and the full table are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_sm90.py"

# every @triton.jit kernel the backends launch (a kernel missing here was not driven by the script)
KERNELS = {"row_stats_kernel", "dense_grad_kernel", "topk_split_kernel", "pair_stats_kernel", "pair_sum_kernel",
           "pair_grad_kernel", "div_row_kernel", "lp_row_kernel", "lp_grad_row_kernel", "_attn_fwd_kernel",
           "_merge_kernel"}


def _ptxas_available():
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton with its bundled ptxas not installed")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow  # ~6 min on 2 cores (compiles ~75 kernel specialisations with ptxas)
def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "sm90.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--cover", "--dtypes", "bf16,fp32", "--jobs", "2",
                          "--json", str(out)], capture_output=True, text=True, env=_env(), timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    data = json.loads(out.read_text())
    results = data["results"]
    assert {r["kernel"] for r in results} == KERNELS
    for r in results:
        assert r["ok"], r
        assert r["fits_smem"], r
        assert r["regs"] > 0 and r["num_warps"] in (1, 2, 4, 8, 16), r
    # both dtypes and both lm_head paths were driven
    sites = " ".join(s for r in results for s in r["sites"])
    for word in ("fused", "chunked", "bfloat16", "float32", "shared_prefix_attention", "merge_attention_states"):
        assert word in sites


def test_compile_error_is_reported(tmp_path):
    """A kernel the GPU compiler rejects (a dot of mismatched shapes) is reported as not ok."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad_kernel(x_ptr, BLOCK: tl.constexpr):
            a = tl.load(x_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
            b = tl.load(x_ptr + tl.arange(0, 2 * BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
            tl.store(x_ptr + tl.arange(0, BLOCK), tl.sum(tl.dot(a, b), 1))
    """))
    probe = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r}); sys.path.insert(0, {str(SCRIPT.parent)!r})
        import triton_sm90 as t
        from bad_kernel import bad_kernel
        launch = t.Launch("bad_kernel", bad_kernel, {{"x_ptr": "*fp32", "BLOCK": "constexpr"}}, {{"BLOCK": 32}}, (0,),
                        {{"num_warps": 4}})
        print(json.dumps(t.compile_sm90(launch)))
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["ok"] is False
    assert report["error"]
