"""The engine's contracts: parameters owned and checked by C++, the layering of the Python package,
the settings object, InfoNCE's closed-form gradients against autograd, seeds, and interruptible calls."""

from __future__ import annotations

import ast
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import hnsample
from hnsample import _C, settings
from hnsample.engine import CpuBackend, CpuKernels, SelectionState, build_selection, draw_seed, registry
from hnsample.ops.info_nce_math import closed_form_grads, row_losses

# ----------------------------------------------------------------------------------------------------
# Parameters: the layout is derived in C++, and every launcher rejects what does not match it


@pytest.mark.parametrize(
    "k,skip,pool,sampling,mode,capacity",
    [
        (5, 0, -1, "top", "window", 5),
        (5, 3, -1, "top", "window", 8),
        (5, 3, 2, "top", "window", 5),  # the window holds only 2
        (5, 3, 9, "top", "window", 8),
        (5, 3, -1, "uniform", "stream", 8),  # skip heap of 3 + key heap of 5
        (5, 3, 9, "softmax", "window", 12),  # the whole bounded pool is kept and drawn from at the end
        (0, 0, -1, "top", "window", 0),
    ],
)
def test_state_layout_is_derived_in_cpp(k, skip, pool, sampling, mode, capacity):
    got_mode, got_capacity = _C.state_layout(k, skip, pool, _C.Sampling.__members__[sampling])
    assert (got_mode.name, got_capacity) == (mode, capacity)
    p = _C.TopkParams()
    p.configure(3, k, skip, pool, _C.Sampling.__members__[sampling])
    assert (p.mode.name, p.capacity) == (mode, capacity)


def _state(rows=4, k=3, **kw) -> SelectionState:
    sel = build_selection(rows, 10, torch.device("cpu"), k, **kw)
    return SelectionState(sel, rows, torch.device("cpu"))


def _offer(params, block):
    CpuKernels().select_block(params, block, 0, 0)


def test_wrong_capacity_is_an_exception_not_a_write():
    state = _state()
    guard = state.st_score.clone()
    p = state.params.copy()
    p.capacity = 4 * state.capacity  # would index far past the (4, 3) state rows
    block = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    with pytest.raises(ValueError, match="capacity 12 .* do not match the layout of k=3"):
        _offer(p, block)
    with pytest.raises(ValueError, match="capacity"):
        CpuKernels().finalize(p, torch.empty(4, 3, dtype=torch.float64), torch.empty(4, 3, dtype=torch.int64))
    assert torch.equal(state.st_count, torch.zeros_like(state.st_count))
    assert torch.equal(state.st_score.view(torch.int64), guard.view(torch.int64))  # untouched


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("mode", _C.SelectMode.stream, "mode"),
        ("st_count", 0, "st_count"),
        ("st_score", 0, "st_score and st_index"),
        ("banned_cols", 2, "banned must be"),
        ("k", -1, ">= 0"),
        ("pool", -2, "pool >= -1"),
        ("min_score", math.nan, "NaN"),
        ("noise_row_offset", -1, "noise_row_offset"),
    ],
)
def test_each_parameter_check_raises(field, value, message):
    p = _state().params.copy()
    setattr(p, field, value)
    with pytest.raises(ValueError, match=message):
        _offer(p, torch.zeros(4, 10))


def test_key_buffer_exactly_when_sampling():
    # With pool = k, "top" and sampling from the pool have the same layout (skip + k slots, window
    # mode): only the key buffer tells them apart.
    plain = _state(pool=3).params.copy()
    plain.sampling = _C.Sampling.uniform
    with pytest.raises(ValueError, match="st_key must be a .* buffer when sampling"):
        _offer(plain, torch.zeros(4, 10))
    keyed = _state(pool=3, sampling="uniform", seed=1).params.copy()
    keyed.sampling = _C.Sampling.top
    with pytest.raises(ValueError, match="st_key must be null"):
        _offer(keyed, torch.zeros(4, 10))
    soft = _state(sampling="softmax", seed=1).params.copy()
    soft.inv_temperature = math.inf
    with pytest.raises(ValueError, match="inv_temperature"):
        _offer(soft, torch.zeros(4, 10))


def test_block_checks():
    state = _state()
    with pytest.raises(ValueError, match=r"rows \[1, 5\) are outside the state's 4 rows"):
        CpuKernels().select_block(state.params, torch.zeros(4, 10), 1, 0)
    with pytest.raises(ValueError, match="col_offset"):
        CpuKernels().select_block(state.params, torch.zeros(4, 10), 0, -1)
    with pytest.raises(ValueError, match="dtype code 99"):
        _C.topk_select_block(state.params, torch.zeros(4, 10).data_ptr(), 99, 4, 10, 10, 1, 0, 0, False, 0, 1)
    with pytest.raises(ValueError, match="data is null"):
        _C.topk_select_block(state.params, 0, 0, 4, 10, 10, 1, 0, 0, False, 0, 1)
    with pytest.raises(ValueError, match="differ in shape"):
        state.merge(_state(rows=3))
    with pytest.raises(ValueError, match="differ in shape"):
        state.merge(_state(k=4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_block_loop_refuses_candidates_of_another_dtype(dtype):
    """The block loop's product reads both operands in the queries' dtype, so float32 queries with a
    16-bit candidate block would read past its end: a TypeError instead, before any block."""
    sel = build_selection(2, 6, torch.device("cpu"), 3)
    with pytest.raises(TypeError, match="candidates must have the dtype and device of queries"):
        hnsample.engine.run_selection(torch.ones(2, 4), torch.ones(6, 4, dtype=dtype), sel, "dot", 1 << 20)


def test_info_nce_params_are_checked():
    p = _C.InfoNceParams()
    p.num_rows, p.num_cols, p.inv_temperature = 2, 3, 1.0
    block = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="row statistics are null"):
        CpuKernels().info_nce_block(p, False, block, None, 0, 0)
    stats = torch.zeros(2, 5, dtype=torch.float64)
    p.row_stats = stats.data_ptr()
    with pytest.raises(ValueError, match="outside the"):
        CpuKernels().info_nce_block(p, False, block, None, 1, 0)
    with pytest.raises(ValueError, match="float32 or float64"):
        CpuKernels().info_nce_block(p, False, block.half(), None, 0, 0)
    p.inv_temperature = 0.0
    with pytest.raises(ValueError, match="inv_temperature"):
        CpuKernels().info_nce_block(p, False, block, None, 0, 0)
    p.inv_temperature = 1.0
    with pytest.raises(TypeError, match="guide block dtype"):  # one dtype code covers both blocks
        CpuKernels().info_nce_block(p, False, block.float(), block, 0, 0)


# ----------------------------------------------------------------------------------------------------
# Layering of the Python package


PACKAGE = Path(hnsample.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {"hnsample._C": Path(_C.__file__)}  # the compiled module
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, including those inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for sub in submodules:
                out.append((sub, []))
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not submodules:
                out.append((target, rest))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = []
    for name, path in modules.items():
        if path.suffix != ".py":
            continue
        for target, names in _imports(name, path, modules):
            if target.startswith("hnsample") and target != name:
                offences += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
    assert offences == []


def test_no_import_cycle():
    modules = {k: v for k, v in _modules().items() if v.suffix == ".py"}
    graph = {name: sorted({t for t, _ in _imports(name, path, modules) if t in modules and t != name})
             for name, path in modules.items()}
    # A package's __init__ runs before its submodules, so an edge from a submodule up to its own package
    # is no cycle of execution order; every other back edge is.
    for name in graph:
        graph[name] = [t for t in graph[name] if not name.startswith(t + ".")]
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


# ----------------------------------------------------------------------------------------------------
# Settings


def test_settings_override_and_environment():
    base = settings.current()
    with settings.override(block_size=1 << 10, cuda_path="two_pass") as s:
        assert settings.current() is s and s.block_size == 1 << 10 and s.cuda_path == "two_pass"
        with settings.override(block_size=7):
            assert settings.current().block_size == 7 and settings.current().cuda_path == "two_pass"
        assert settings.current().block_size == 1 << 10
    assert settings.current() == base
    env = {"HNSAMPLE_BLOCK_SIZE": "0x400", "HNSAMPLE_CUDA_FUSED_AUTO": "yes", "HNSAMPLE_CUDA_L2_SHARE": "0.25"}
    s = settings.Settings.from_env(env)
    assert (s.block_size, s.cuda_fused_auto, s.cuda_l2_share) == (1024, True, 0.25)
    with pytest.raises(ValueError, match="HNSAMPLE_BLOCK_SIZE"):
        settings.Settings.from_env({"HNSAMPLE_BLOCK_SIZE": "big"})
    with pytest.raises(ValueError, match="cuda_path"):
        settings.override(cuda_path="fast").__enter__()
    with pytest.raises(TypeError, match="block_size must be a int"):
        settings.Settings(block_size=1.5)


def test_default_block_size_follows_the_device_type():
    # CUDA's two-pass path gets its own default (fewer, larger blocks: the host cost per block), the CPU
    # keeps block_size; an explicit block_size is passed through unchanged on either.
    s = settings.Settings.from_env({"HNSAMPLE_CUDA_BLOCK_SIZE": "4096", "HNSAMPLE_BLOCK_SIZE": "512"})
    assert (s.block_size_for("cpu"), s.block_size_for("cuda")) == (512, 4096)
    with pytest.raises(ValueError, match="cuda_block_size must be >= 1"):
        settings.Settings(cuda_block_size=0)
    seen = []

    class Recording(CpuBackend):
        def select(self, queries, candidates, state, metric, block_size, *args, **kwargs):
            seen.append(block_size)
            return super().select(queries, candidates, state, metric, block_size, *args, **kwargs)

    q, c = torch.randn(3, 4), torch.randn(20, 4)
    with registry.use("cpu", Recording()), settings.override(block_size=64, cuda_block_size=1 << 20):
        hnsample.topk_similarity(q, c, 2)
        hnsample.topk_similarity(q, c, 2, block_size=8)
    assert seen == [64, 8]


def test_settings_block_size_does_not_change_results():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randint(-3, 4, (20, 8), generator=g).float(), torch.randint(-3, 4, (300, 8), generator=g).float()
    want = hnsample.topk_similarity(q, c, 7, skip_top=2)
    with settings.override(block_size=37):
        got = hnsample.topk_similarity(q, c, 7, skip_top=2)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


# ----------------------------------------------------------------------------------------------------
# InfoNCE: the fused pass's closed-form derivatives are those of the row losses


@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.6])
def test_closed_form_grads_equal_autograd_of_row_losses(tau_plus):
    g = torch.Generator().manual_seed(int(tau_plus * 10))
    b, p = 9, 3
    s_pos = torch.randn(b, p, generator=g, dtype=torch.float64).requires_grad_()
    valid = torch.rand(b, p, generator=g) > 0.3
    valid[0] = False  # a row without positives
    s1 = (torch.randn(b, generator=g, dtype=torch.float64) + 2).requires_grad_()
    s0 = torch.randn(b, generator=g, dtype=torch.float64).requires_grad_()
    count = torch.randint(0, 5, (b,), generator=g).double()
    tau = torch.tensor(0.3, dtype=torch.float64)
    idx = torch.zeros(b, p, dtype=torch.int64)
    rows = row_losses(s_pos, valid, tau, s1, s0, count, torch.zeros(1, dtype=torch.float64), idx, 0.05, tau_plus,
                      False)
    d_s1, d_s0, d_pos = torch.autograd.grad(rows.sum(), (s1, s0, s_pos), allow_unused=True)
    g1, g_l = closed_form_grads(s_pos.detach(), valid, tau, s1.detach(), s0.detach(), count, 0.05, tau_plus)
    torch.testing.assert_close(g1, d_s1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(-g1, d_s0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_l / tau, d_pos, rtol=1e-12, atol=1e-12)  # l = (s - margin) / tau
    torch.autograd.gradcheck(
        lambda a, b_, c: row_losses(a, valid, tau, b_, c, count, torch.zeros(1, dtype=torch.float64), idx, 0.05,
                                    tau_plus, False),
        (s_pos, s1, s0))


# ----------------------------------------------------------------------------------------------------
# Seeds


def test_every_int_seed_gives_its_own_sample():
    s = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))

    def draw(seed):
        return hnsample.topk_from_scores(s, 5, sampling="softmax", seed=seed).indices

    seeds = [5, 5 + 2**63, -(2**63) + 5, -5, 2**64 + 5, 2**64 - 1]
    samples = [draw(x) for x in seeds]
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            assert not torch.equal(samples[i], samples[j]), (seeds[i], seeds[j])
    assert torch.equal(draw(5 + 2**63), draw(5 + 2**63))
    assert draw_seed(12345, None) == 12345 and draw_seed(2**64 - 1, None) == 2**64 - 1
    assert draw_seed(-1, None) == draw_seed(-1, None) != draw_seed(2**64 - 1, None)


# ----------------------------------------------------------------------------------------------------
# Interruptible calls


class _RecordingKernels(CpuKernels):
    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def select_block(self, params, block, row_offset, col_offset):
        self.rows.append(block.shape[0])
        super().select_block(params, block, row_offset, col_offset)


def test_a_large_score_matrix_is_selected_in_row_chunks():
    # Python acts on Ctrl-C between kernel calls: one call over a large matrix is cut into row chunks of
    # about settings.interrupt_seconds of work each, and the result does not depend on the cut.
    s = torch.randn(300, 2000, generator=torch.Generator().manual_seed(2))
    want = hnsample.topk_from_scores(s, 4, sampling="softmax", seed=3)
    kernels = _RecordingKernels()
    with registry.use("cpu", CpuBackend(kernels)), settings.override(interrupt_seconds=1e-3):
        got = hnsample.topk_from_scores(s, 4, sampling="softmax", seed=3)
    assert len(kernels.rows) > 10 and sum(kernels.rows) == 300
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


INTERRUPTED = textwrap.dedent("""
    import signal, sys, time, threading, os
    import torch, hnsample
    # Python's own Ctrl-C handler even where the parent left SIGINT ignored (a child then inherits the
    # ignore and Python installs no handler at start-up): the test is about the call, not the parent.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    s = torch.randn(8000, 50000)
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        hnsample.topk_from_scores(s, 64, sampling="softmax", temperature=0.05, seed=1)
        print("finished", time.monotonic() - t0, flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic() - float(sys.stdin.readline()), flush=True)
""")


@pytest.mark.slow
def test_ctrl_c_stops_a_large_topk_from_scores_call(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    proc.stdin.write(f"{time.monotonic()}\n")
    proc.stdin.flush()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    word, seconds = out.split()
    # The whole call takes far longer than a second here; interrupted, it stops at the next chunk.
    assert word == "interrupted", out
    assert float(seconds) < 5.0, out
