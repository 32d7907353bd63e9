"""Compile the Triton kernels for a GPU that is not here and report what a launch would need.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole compiler
(through the ptxas shipped in the triton wheel) on a CPU machine. Per (variant, config, arch)
`compile_report` gives the shared memory a launch needs, registers and spills (from ptxas -v),
and how many tensor-core instructions the PTX holds (wgmma.mma_async on sm_90a, mma.sync on
sm_80). tests/test_kernels_compile.py runs it over every reachable pair. `concurrent_compile_reports`
compiles a variant's configs through the autotuner's concurrent path instead (JIT warm-ups against a
stand-in driver for the absent GPU), so the test can check it builds the same kernels.

  python -m kernels.compile_check            # every variant and config, sm_90 and sm_80, as JSON lines
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
import time

# Shared memory one block may use (bytes): H100/H200 (sm_90) and A100 (sm_80), opt-in maximum.
SHARED_LIMITS = {90: 232448, 80: 166912}


def _divisible_args(variant) -> list[str]:
    """Arguments the launcher's real calls make 16-divisible in the common case (pointers and sizes
    of aligned shapes): the compiled specialisation that matters for speed and resources."""
    from kernels.linear_ce_triton import signature

    return [name for name, kind in signature(variant).items() if kind.startswith("*") or name not in ("N",)]


def compile_report(variant_name: str, config_index: int, capability: int) -> dict:
    """Compile one (variant, config) for sm_<capability> and report its resources."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    import kernels.linear_ce_triton as K

    variant = next(v for v in K.variants() if v.name == variant_name)
    config = K.configs(variant)[config_index]
    fn = K.KERNELS[variant.kernel]
    if K.INTERPRETED:
        raise RuntimeError("compile_report needs Triton imported without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", capability, 32)
    consts = dict(variant.constexprs(), **config.kwargs)
    sig = dict(K.signature(variant), **{k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in _divisible_args(variant)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options(dict(num_warps=config.num_warps, num_stages=config.num_stages))
    log = io.StringIO()
    start = time.time()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the ptxas -v report it already produces
        knobs.compilation.always_compile = True  # a real compile each time (ptxas log; no cached result)
        compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx, ptxas = compiled.asm["ptx"], log.getvalue()
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, ptxas)) else None
    return dict(variant=variant_name, config=config_index, capability=capability,
                tiles="{BLOCK_N}x{BLOCK_V}x{BLOCK_D}".format(**config.kwargs),
                warps=config.num_warps, stages=config.num_stages,
                arch=re.search(r"\.target (sm_\w+)", ptx).group(1), shared=compiled.metadata.shared,
                shared_limit=SHARED_LIMITS[capability], registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"),
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                tensor_cores_required=variant.tensor_cores, compile_s=round(time.time() - start, 1),
                ptx_sha256=hashlib.sha256(ptx.encode()).hexdigest())


class _TargetDriver:
    """Triton's active driver for a GPU that is not here: a JIT warm-up asks the driver only for the
    target to compile for, the current device and its stream (nothing is loaded or launched)."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _warmup_args(variant) -> list:
    """Positional warm-up arguments specialised like compile_report's: torch dtypes for the pointers
    (Triton's warmup stands a 16-aligned mock tensor in for each), 16-divisible sizes, N not."""
    import torch

    from kernels.linear_ce_triton import signature

    dtypes = {"*bf16": torch.bfloat16, "*fp32": torch.float32, "*i64": torch.int64}
    return [dtypes[kind] if kind.startswith("*") else (1000 if name == "N" else 1024)
            for name, kind in signature(variant).items()]


def concurrent_compile_reports(variant_name: str, capability: int) -> list[dict]:
    """Compile every config of one variant for sm_<capability> through the tuner's concurrent path
    (linear_ce_triton.compile_candidates: JIT warm-ups in Triton's AsyncCompileMode) and report, per
    config, what compile_report's one-at-a-time compile reports too: shared memory and the PTX hash."""
    from triton import knobs
    from triton.runtime import driver

    import kernels.linear_ce_triton as K

    if K.INTERPRETED:
        raise RuntimeError("concurrent_compile_reports needs Triton imported without TRITON_INTERPRET=1")
    variant = next(v for v in K.variants() if v.name == variant_name)
    candidates = K.configs(variant)
    driver.set_active(_TargetDriver(capability))
    try:
        with knobs.compilation.scope():
            knobs.compilation.always_compile = True  # compiled here, not found in compile_report's cache
            start = time.time()
            compiled = K.compile_candidates(variant, candidates, lambda config: _warmup_args(variant))
            seconds = round(time.time() - start, 1)
    finally:
        driver.set_active(None)  # back to finding the real driver when first asked (reset_active asks now)
    return [dict(variant=variant_name, config=i, capability=capability, shared=k.metadata.shared,
                 ptx_sha256=hashlib.sha256(k.asm["ptx"].encode()).hexdigest(), compile_s=seconds)
            for i, k in enumerate(compiled)]


def problems(report: dict) -> list[str]:
    """What would stop this compiled config from launching well (empty = fine)."""
    out = []
    if report["shared"] > report["shared_limit"]:
        out.append(f"needs {report['shared']} B of shared memory, the limit is {report['shared_limit']}")
    if report["spill_stores"] is None:
        out.append("no ptxas register report")
    elif report["spill_stores"] or report["spill_loads"]:
        out.append(f"spills registers ({report['spill_stores']} B stored, {report['spill_loads']} B loaded)")
    if report["tensor_cores_required"]:
        count = report["wgmma"] if report["capability"] >= 90 else report["mma_sync"]
        if not count:
            out.append(f"no tensor-core instructions ({'wgmma' if report['capability'] >= 90 else 'mma.sync'})")
    return out


def all_cases(capabilities=(90, 80)) -> list[tuple[str, int, int]]:
    """(variant, config index, capability) for every config the launcher may pick."""
    import kernels.linear_ce_triton as K

    return [(v.name, i, cc) for cc in capabilities for v in K.variants() for i in range(len(K.configs(v)))]


def main(argv=None):
    args = argv if argv is not None else sys.argv[1:]
    for case in all_cases():
        if args and not any(a in case[0] for a in args):
            continue
        report = compile_report(*case)
        print(json.dumps(dict(report, problems=problems(report))), flush=True)


if __name__ == "__main__":
    main()
