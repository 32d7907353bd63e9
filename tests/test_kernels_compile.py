"""Every Triton kernel config the launcher may pick compiles for H100 (sm_90a) and A100 (sm_80) and
would launch: shared memory within the block limit, no register spills, and tensor-core
instructions in every bf16 / TF32 variant. No GPU needed: Triton compiles for a target that is not
here (kernels/compile_check.py), in a pool of fresh processes without TRITON_INTERPRET, with a
Triton cache inside pytest's tmp folder. The autotuner's concurrent compile builds the same kernels.
"""
import concurrent.futures as cf
import json
import multiprocessing
import os

import pytest
import torch

import kernels.linear_ce_triton as K
from kernels.compile_check import all_cases, compile_report, concurrent_compile_reports, problems

CASES = all_cases()
CONCURRENT_VARIANT = "sweep-fwd-bf16"  # three configs, among the quickest to compile
CONCURRENT_CASES = [case for case in CASES if case[0] == CONCURRENT_VARIANT and case[2] == 90]


def _in_fresh_processes(jobs, cache):
    """[result or the error as a string] of each (function, args) job, run in a pool of fresh processes
    that compile (no TRITON_INTERPRET) with a Triton cache in `cache`."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_CACHE_DIR", str(cache))
        env.delenv("TRITON_INTERPRET", raising=False)  # the workers compile; they must not interpret
        env.setenv("TRITON_DEFAULT_FP_FUSION", "1")
        workers = max(1, min(4, len(os.sched_getaffinity(0))))
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fn, *args) for fn, args in jobs]
            out = []
            for future in futures:
                try:
                    out.append(future.result())
                except Exception as e:  # a compile error is a failed case, reported by its test
                    out.append(f"{type(e).__name__}: {str(e)[:400]}")
    return out


@pytest.fixture(scope="module")
def reports(request, tmp_path_factory):
    """{case: report or the compile error} for the selected cases (and those the concurrent-compile
    test compares with), each compiled one at a time in a fresh process."""
    selected = {item.callspec.params["case"] for item in request.session.items  # this module's items only
                if item.module is request.module and getattr(item, "callspec", None) and "case" in item.callspec.params}
    order = sorted(selected | set(CONCURRENT_CASES), key=lambda case: ("ieee" not in case[0], case))  # FMA first
    results = _in_fresh_processes([(compile_report, case) for case in order], tmp_path_factory.mktemp("triton-cache"))
    out = dict(zip(order, results))
    if os.environ.get("DSEL_COMPILE_REPORT"):  # optional: keep the table (e.g. for benchmarks/RESULTS.md)
        with open(os.environ["DSEL_COMPILE_REPORT"], "w") as f:
            json.dump([r for r in out.values() if isinstance(r, dict)], f, indent=1)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{v}-cfg{i}-sm{cc}" for v, i, cc in CASES])
def test_config_compiles_within_limits(reports, case):
    report = reports[case]
    assert isinstance(report, dict), f"{case} does not compile: {report}"
    assert problems(report) == [], f"{case}: {report}"


def test_every_launch_reaches_a_listed_variant():
    """The variants compiled above are all the launcher can ask for (dtype x precision x tangents)."""
    listed = set(K.variants())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for precision in ("highest", "high"):
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                reached = {K.variant_for(kernel, _FakeCuda(dtype), dh, dw)
                           for kernel, dh, dw in (("sweep", False, False), ("sweep", True, True),
                                                  ("sweep", True, False), ("sweep", False, True),
                                                  ("grad", False, False))}
            finally:
                torch.set_float32_matmul_precision(before)
            assert reached <= listed, reached - listed
    assert all(K.configs(v) for v in listed)


def test_tuner_compiles_its_candidates_concurrently_into_the_same_kernels(reports, tmp_path):
    """The autotuner's compile step (linear_ce_triton.compile_candidates: JIT warm-ups of every
    candidate at once in Triton's AsyncCompileMode) builds, for sm_90a, the very kernels that
    separate one-at-a-time compiles build: same shared memory, same PTX."""
    concurrent, = _in_fresh_processes([(concurrent_compile_reports, (CONCURRENT_VARIANT, 90))], tmp_path)
    assert isinstance(concurrent, list), concurrent
    serial = [reports[case] for case in CONCURRENT_CASES]
    assert len(concurrent) == len(serial) == len(K.configs(K.Variant("sweep", "bf16"))) > 1
    for one_by_one, together in zip(serial, concurrent):
        assert isinstance(one_by_one, dict), one_by_one
        assert (together["shared"], together["ptx_sha256"]) == (one_by_one["shared"], one_by_one["ptx_sha256"])


class _FakeCuda:
    """Stands in for a CUDA tensor of a dtype (variant_for reads only .dtype and .is_cuda)."""

    is_cuda = True

    def __init__(self, dtype):
        self.dtype = dtype
