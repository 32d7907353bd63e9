"""Compile the Triton kernels for a GPU that is not here and report what a launch would need.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole compiler
(through the ptxas shipped in the triton wheel) on a CPU machine. Per (variant, config, arch)
`compile_report` gives the shared memory a launch needs, registers and spills (from ptxas -v),
and how many tensor-core instructions the PTX holds (wgmma.mma_async on sm_90a, mma.sync on
sm_80). tests/test_kernels_compile.py runs it over every reachable pair.

  python -m kernels.compile_check            # every variant and config, sm_90 and sm_80, as JSON lines
"""
from __future__ import annotations

import contextlib
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
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the ptxas -v report it already produces
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
                tensor_cores_required=variant.tensor_cores, compile_s=round(time.time() - start, 1))


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
