"""The CUDA kernels of csrc/kernels, compiled for the CPU against the project's host runtime
(csrc/kernels/host/), and called from Python through ctypes on torch CPU tensors.

The library is built from the sources of the checkout this file sits in, once per content: each
object's cache key hashes its source, every header under csrc/kernels, the flags and the compiler's
version (build/host_kernels/), so a re-run does not rebuild and a changed kernel always does. `HostKernels.forward(...)` and friends take
tensors and plain numbers, poison every output and workspace before the launch, call the launcher
and raise `HostKernelError` (with the runtime's description: kernel, block, thread) when it fails.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # tests/kernels/ -> the repository
CSRC = ROOT / "csrc"
KERNELS = CSRC / "kernels"
HOST = KERNELS / "host"
CACHE = ROOT / "build" / "host_kernels"

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SCHEDULES = {"in_order": 0, "reversed": 1, "random": 2}

# -fno-strict-aliasing: the kernels read 16-byte vectors through pointers to the element type, as
# CUDA code does; nvcc allows it, and g++'s aliasing rules must not turn it into a miscompile.
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
                "-Wno-sign-compare", "-Wno-unused-function", "-DONLINE_SOFTMAX_HOST_KERNELS",
                "-include", "kernels/host/runtime.h"]
VARIANTS = {
    "release": ["-O2"],
    # UBSan and ASan. ASan needs its runtime loaded first, so this variant is an executable
    # (host/sanitize_main.cpp), not a library for Python.
    "sanitize": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                 "-fno-sanitize-recover=undefined"],
}


class HostKernelError(RuntimeError):
    """A launcher returned an error; the message is the host runtime's description."""

    def __init__(self, code, message):
        super().__init__(f"cudaError {code}: {message}")
        self.code = code
        self.message = message


def find_cxx():
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def find_cuda_include():
    """The CUDA toolkit's include folder (for cuda_fp16.h, cuda_bf16.h and the runtime's types)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in homes:
        if not home:
            continue
        for inc in (Path(home) / "include", Path(home) / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_runtime.h").exists() and (inc / "cuda_fp16.h").exists():
                return inc
    return None


def missing_toolchain():
    """Why the host runtime cannot be built here (no C++ compiler, no CUDA headers), or None. CI
    must have both: there a missing one raises instead of skipping, since the host-executed tests
    are how CI checks the CUDA sources."""
    missing = ("no C++ compiler" if find_cxx() is None else "no CUDA headers (cuda_fp16.h): set CUDA_HOME"
               if find_cuda_include() is None else None)
    if missing and os.environ.get("CI"):
        raise RuntimeError(f"host-executed kernel tests cannot run in CI: {missing}")
    return missing


def requires_toolchain():
    """The pytestmark of a module of host-executed tests: a skip, with its reason, only where the
    toolchain is missing. A build failure with the toolchain present is a test failure."""
    missing = missing_toolchain()
    return pytest.mark.skipif(missing is not None, reason=f"host-executed kernels: {missing}")


def sources():
    return sorted(KERNELS.glob("*.cu")) + [HOST / "runtime.cpp", HOST / "entry.cpp", HOST / "selftest.cpp"]


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _headers_digest():
    headers = sorted(p for p in KERNELS.rglob("*") if p.suffix in (".h", ".cuh") and p.is_file())
    return _digest(*[x for p in headers for x in (str(p.relative_to(ROOT)), p.read_bytes())])


def _compile_all(cxx, flags, srcs, variant, link_args, target_name):
    """Objects are cached one by one (a changed .cu rebuilds only itself; a changed header, all),
    then linked into CACHE/<variant>-<digest of the objects>/<target_name>."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    common = _digest(version, " ".join(flags), _headers_digest())
    obj_dir = CACHE / "objects" / variant
    obj_dir.mkdir(parents=True, exist_ok=True)
    objs = [obj_dir / f"{src.name}-{_digest(common, src.read_bytes())}.o" for src in srcs]
    target = CACHE / f"{variant}-{_digest(*[o.name for o in objs], ' '.join(link_args))}" / target_name
    if target.exists():
        return target

    def one(job):
        src, obj = job
        if obj.exists():
            return
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *flags, *lang, "-c", str(src), "-o", str(tmp)]
        proc = subprocess.run(cmd, cwd=CSRC, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"host kernel build failed: {' '.join(cmd)}\n{proc.stderr[-6000:]}")
        os.replace(tmp, obj)  # atomic: a concurrent run sees the whole file or none

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(one, zip(srcs, objs)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([cxx, *flags, *[str(o) for o in objs], *link_args, "-o", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"host kernel link failed:\n{proc.stderr[-6000:]}")
    os.replace(tmp, target)
    return target


def build(variant="release"):
    """Path of the built library (release) or sanitizer executable, building what is missing."""
    cxx, inc = find_cxx(), find_cuda_include()
    if cxx is None or inc is None:
        raise FileNotFoundError("no C++ compiler" if cxx is None else "no CUDA headers (cuda_fp16.h)")
    flags = COMMON_FLAGS + [f"-I{CSRC}", f"-I{inc}"] + VARIANTS[variant]
    srcs = sources()
    if variant == "release":
        # -Bsymbolic: the runtime's own cudaGetLastError, cudaFuncSetAttribute, ... must win over a
        # real libcudart that a CUDA build of torch has loaded with RTLD_GLOBAL into this process.
        # Without it every launch there reported cudaErrorInsufficientDriver (35), and on a GPU
        # machine the launchers would have asked the real runtime.
        return _compile_all(cxx, flags, srcs, variant, ["-shared", "-Wl,-Bsymbolic", "-ldl", "-lpthread"],
                            "libosm_host_kernels.so")
    return _compile_all(cxx, flags, srcs + [HOST / "sanitize_main.cpp"], variant, ["-ldl", "-lpthread"],
                        "sanitize_main")


@dataclass(frozen=True)
class Limits:
    """DeviceLimits as the launchers see them. Small values make the split paths run on small data."""
    num_sms: int = 1
    max_smem_per_block: int = 48 * 1024


def plan_for(op, shape, dtype, limits, *, dim=-1, k=None, out_dtype=None, num_samples=None, min_log_ratio=False,
             **more):
    """online_softmax.cuda_plan (the extension's copy of launch_plan.h) for the limits a host test uses;
    `more`: cuda_plan's other keywords (draft_dtype, ...)."""
    import online_softmax as osm  # here: the bare ctypes front (a subprocess's) needs no extension

    device = {"sm_count": limits.num_sms, "max_smem_per_block": limits.max_smem_per_block, "l2_bytes": 0,
              "cc": (9, 0)}
    return osm.cuda_plan(op, shape, dtype, dim, k=k, device=device, out_dtype=out_dtype, num_samples=num_samples,
                         min_log_ratio=min_log_ratio, **more)


def assert_ran(hk, plan, expect=None):
    """The launches since the last call are exactly the plan's (kernel, grid, block, shared memory),
    and, when given, `expect` names its kernels."""
    ran = hk.launch_configs()
    want = [(l.kernel, l.grid, l.block[0], l.block[1], l.smem) for l in plan.launches]
    assert ran == want, f"cuda_plan says {want}, the launcher ran {ran}"
    if expect is not None:
        assert [r[0] for r in ran] == expect, f"expected kernels {expect}, ran {ran}"


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _poison(t):
    if t is not None:
        t.view(torch.uint8).fill_(0xFF) if t.dtype != torch.int64 else t.fill_(-(2 ** 62))
    return t


def _edit_args(edit_ids, edit_values):
    """The sampling launchers' trailing (edit_ids, edit_values, num_edits): contiguous (rows, E)."""
    if edit_ids is None or edit_ids.shape[1] == 0:
        return ctypes.c_void_p(0), ctypes.c_void_p(0), 0
    assert edit_ids.is_contiguous() and edit_values.is_contiguous() and edit_ids.shape == edit_values.shape
    return _ptr(edit_ids), _ptr(edit_values), edit_ids.shape[1]


def _workspace(nbytes):
    return _poison(torch.empty(max(int(nbytes), 1), dtype=torch.uint8)) if nbytes else None


class HostKernels:
    """ctypes front of the host-built launchers (csrc/kernels/host/entry.cpp)."""

    def __init__(self, path=None):
        self.path = Path(path) if path else build("release")
        lib = ctypes.CDLL(str(self.path))
        i64, i32, f64, vp, sz = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p, ctypes.c_size_t
        lib.osm_host_forward_workspace_bytes.argtypes = [i32, i64, i64, i64, i32, i32]
        lib.osm_host_forward_workspace_bytes.restype = sz
        lib.osm_host_forward.argtypes = [i32, i32, vp, vp, vp, vp, i64, i64, i64, f64, i32, vp, i32, i32]
        lib.osm_host_backward_workspace_bytes.argtypes = [i32, i64, i64, i64, i32, i32]
        lib.osm_host_backward_workspace_bytes.restype = sz
        lib.osm_host_backward.argtypes = [i32, i32, vp, vp, vp, i64, i64, i64, f64, i32, vp, i32, i32]
        lib.osm_host_topk_max_k.argtypes = [i32]
        lib.osm_host_topk_max_k.restype = i64
        lib.osm_host_topk_workspace_bytes.argtypes = [i32, i64, i64, i64, i32, i32]
        lib.osm_host_topk_workspace_bytes.restype = sz
        lib.osm_host_topk.argtypes = [i32, vp, vp, vp, vp, vp, i64, i64, i64, f64, i32, vp, i32, i32]
        lib.osm_host_topk_backward.argtypes = [i32, vp, vp, vp, vp, vp, vp, i64, i64, i64, f64, i32, vp, i32, i32]
        lib.osm_host_sample_workspace_bytes.argtypes = [i32, i64, i64]
        lib.osm_host_sample_workspace_bytes.restype = sz
        lib.osm_host_sample_categorical.argtypes = [i32, vp, i64, i64, vp, vp, vp, i64, vp, vp, vp, i32, vp, vp, i64]
        lib.osm_host_top_p_threshold.argtypes = [i32, vp, i64, i64, vp, vp, vp, vp, i32, vp, vp, i64]
        lib.osm_host_cross_entropy_backward.argtypes = [i32, vp, vp, vp, vp, vp, vp, vp, vp, vp, i64, i64, vp, i32,
                                                        i32]
        lib.osm_host_token_logprobs_backward.argtypes = [i32, vp, vp, vp, vp, vp, vp, vp, f64, vp, i64, i64, vp,
                                                         i32, i32]
        lib.osm_host_masked_forward.argtypes = [i32, i32, vp, vp, i64, i64, f64, i32, i32, vp, i32, vp, vp, i64,
                                                i64, i64, i32, i32]
        lib.osm_host_rejection_workspace_bytes.argtypes = [i32, i64, i64, i64, i32, i32]
        lib.osm_host_rejection_workspace_bytes.restype = sz
        lib.osm_host_rejection_sample.argtypes = [i32, i32, vp, i64, i64, i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                                  i32]
        lib.osm_host_token_logprobs.argtypes = [i32, vp, i64, i64, vp, vp, i64, f64, vp, vp, vp, vp, vp, vp, vp, i32]
        lib.osm_host_distillation_forward.argtypes = [i32, vp, vp, vp, i32, f64, f64, f64, i64, vp, vp, i64, i64, vp,
                                                      i32, i32]
        lib.osm_host_distillation_backward.argtypes = [i32, vp, vp, vp, i32, f64, f64, f64, i64, vp, vp, vp, i64, i64,
                                                       vp, i32, i32]
        lib.osm_host_set_schedule.argtypes = [i32, ctypes.c_uint64]
        lib.osm_host_last_error.restype = ctypes.c_char_p
        lib.osm_host_launch_log.restype = ctypes.c_char_p
        lib.osm_host_selftest.argtypes = [i32, vp, vp, i32, i32, i32]
        self.lib = lib

    # ---- runtime controls ----
    def set_schedule(self, name, seed=0):
        self.lib.osm_host_set_schedule(SCHEDULES[name], seed)

    def launches(self):
        """Kernel names launched since the last call (as the launch spells them, e.g.
        'register_rows_kernel<T, O, cfg.group, cfg.vecs, cfg.block>')."""
        return [launch[0] for launch in self.launch_configs()]

    def launch_configs(self):
        """(kernel, grid, block_x, block_y, dynamic smem) of each launch since the last call."""
        log = self.lib.osm_host_launch_log().decode()
        self.lib.osm_host_clear_launch_log()
        out = []
        for line in log.splitlines():
            name, grid, block, smem = line.rsplit(" ", 3)
            bx, by = block.split("=")[1].split("x")
            out.append((name.split("<")[0], int(grid.split("=")[1]), int(bx), int(by), int(smem.split("=")[1])))
        return out

    def selftest(self, which, inp=None, out=None, a=0, b=0, c=0):
        """Runs one of host/selftest.cpp's kernels; returns (cudaError code, runtime message)."""
        code = self.lib.osm_host_selftest(which, _ptr(inp), _ptr(out), a, b, c)
        return code, (self.lib.osm_host_last_error().decode() if code else "")

    def _check(self, code):
        if code != 0:
            raise HostKernelError(code, self.lib.osm_host_last_error().decode())

    # ---- launchers ----
    def forward(self, x, layout, scale=1.0, log=False, out_dtype=None, limits=Limits(), y=True, max_out=True,
                sumexp_out=True):
        """softmax_forward over a contiguous x seen as layout = (outer, size, inner). Returns
        (y, max, sumexp), None for each output not asked for (passed to the launcher as null)."""
        assert x.is_contiguous()
        outer, size, inner = layout
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out_dtype = out_dtype or x.dtype
        yt = _poison(torch.empty(x.shape, dtype=out_dtype)) if y else None
        mo = _poison(torch.empty(outer * inner, dtype=acc)) if max_out else None
        so = _poison(torch.empty(outer * inner, dtype=acc)) if sumexp_out else None
        code = DTYPE_CODES[x.dtype]
        ws = _workspace(self.lib.osm_host_forward_workspace_bytes(code, outer, size, inner, limits.num_sms,
                                                                   limits.max_smem_per_block))
        self._check(self.lib.osm_host_forward(code, DTYPE_CODES[out_dtype], _ptr(x), _ptr(yt), _ptr(mo), _ptr(so),
                                              outer, size, inner, scale, int(log), _ptr(ws), limits.num_sms,
                                              limits.max_smem_per_block))
        return yt, mo, so

    def backward(self, dy, y, layout, scale=1.0, log=False, dx_dtype=None, limits=Limits()):
        assert dy.is_contiguous() and y.is_contiguous() and dy.dtype == y.dtype
        outer, size, inner = layout
        dx = _poison(torch.empty(y.shape, dtype=dx_dtype or y.dtype))
        code = DTYPE_CODES[y.dtype]
        ws = _workspace(self.lib.osm_host_backward_workspace_bytes(code, outer, size, inner, limits.num_sms,
                                                                    limits.max_smem_per_block))
        self._check(self.lib.osm_host_backward(code, DTYPE_CODES[dx.dtype], _ptr(dy), _ptr(y), _ptr(dx), outer, size,
                                               inner, scale, int(log), _ptr(ws), limits.num_sms,
                                               limits.max_smem_per_block))
        return dx

    def topk_max_k(self, dtype):
        return self.lib.osm_host_topk_max_k(DTYPE_CODES[dtype])

    def softmax_topk(self, x, k, scale=1.0, log=False, limits=Limits()):
        """Rows of a contiguous 2-d x. Returns (values, indices, max, sumexp)."""
        assert x.is_contiguous() and x.dim() == 2
        rows, n = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        values = _poison(torch.empty(rows, k, dtype=x.dtype))
        indices = _poison(torch.empty(rows, k, dtype=torch.int64))
        mo = _poison(torch.empty(rows, dtype=acc))
        so = _poison(torch.empty(rows, dtype=acc))
        code = DTYPE_CODES[x.dtype]
        ws = _workspace(self.lib.osm_host_topk_workspace_bytes(code, rows, n, k, limits.num_sms,
                                                                limits.max_smem_per_block))
        self._check(self.lib.osm_host_topk(code, _ptr(x), _ptr(values), _ptr(indices), _ptr(mo), _ptr(so), rows, n,
                                           k, scale, int(log), _ptr(ws), limits.num_sms, limits.max_smem_per_block))
        return values, indices, mo, so

    def softmax_topk_backward(self, grad_values, x, indices, max_in, sumexp_in, scale=1.0, log=False,
                              limits=Limits(), return_error=False):
        """indices sorted ascending per row (the binding's contract); grad_values in the same order.
        With return_error, returns (dx, error flag) — the flag is 1 when an index was out of range."""
        rows, n = x.shape
        k = indices.shape[1]
        dx = _poison(torch.empty_like(x))
        error = torch.zeros(1, dtype=torch.int32)
        self._check(self.lib.osm_host_topk_backward(DTYPE_CODES[x.dtype], _ptr(grad_values), _ptr(x), _ptr(indices),
                                                    _ptr(max_in), _ptr(sumexp_in), _ptr(dx), rows, n, k, scale,
                                                    int(log), _ptr(error), limits.num_sms,
                                                    limits.max_smem_per_block))
        return (dx, int(error.item())) if return_error else dx

    def sample_categorical(self, x, temperature, min_log_ratio, uniforms, limits=Limits(), edit_ids=None,
                           edit_values=None):
        """Rows of a contiguous 2-d x; float64 (rows,) temperature and cut (or None), (rows, S)
        uniforms; contiguous (rows, E) edits as the op takes them, or None. Returns (tokens, log_probs)."""
        assert x.is_contiguous() and x.dim() == 2
        rows, n = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        tokens = _poison(torch.empty(rows, uniforms.shape[1], dtype=torch.int64))
        log_probs = _poison(torch.empty(rows, uniforms.shape[1], dtype=acc))
        code = DTYPE_CODES[x.dtype]
        ws = _workspace(self.lib.osm_host_sample_workspace_bytes(code, rows, n))
        self._check(self.lib.osm_host_sample_categorical(code, _ptr(x), rows, n, _ptr(temperature), _ptr(min_log_ratio),
                                                         _ptr(uniforms), uniforms.shape[1], _ptr(tokens),
                                                         _ptr(log_probs), _ptr(ws), limits.num_sms,
                                                         *_edit_args(edit_ids, edit_values)))
        return tokens, log_probs

    def top_p_threshold(self, x, temperature, top_p, limits=Limits(), edit_ids=None, edit_values=None):
        assert x.is_contiguous() and x.dim() == 2
        rows, n = x.shape
        ratio = _poison(torch.empty(rows, dtype=torch.float64))
        status = _poison(torch.empty(rows, dtype=torch.int64))
        self._check(self.lib.osm_host_top_p_threshold(DTYPE_CODES[x.dtype], _ptr(x), rows, n, _ptr(temperature),
                                                      _ptr(top_p), _ptr(ratio), _ptr(status), limits.num_sms,
                                                      *_edit_args(edit_ids, edit_values)))
        return ratio, status

    def rejection_sample(self, target_logits, draft_token_ids, draft_probs, num_draft_tokens, temperature,
                         min_log_ratio, uniforms, limits=Limits()):
        """The op's arguments as rejection_sample takes them (csrc/ops.cpp), contiguous: target (batch,
        n + 1, vocab), int64 drafts (batch, n) and counts (batch,), draft_probs (batch, n, vocab) in
        float32 or the target's dtype or None, float64 temperature (batch,), cuts (batch, n + 1) or None,
        uniforms (batch, n + 1). Returns (token_ids, num_accepted, log_probs)."""
        assert target_logits.dim() == 3
        assert all(t is None or t.is_contiguous() for t in (target_logits, draft_token_ids, draft_probs,
                                                             num_draft_tokens, temperature, min_log_ratio, uniforms))
        batch, n1, vocab = target_logits.shape
        acc = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
        tokens = _poison(torch.empty(batch, n1, dtype=torch.int64))
        accepted = _poison(torch.empty(batch, dtype=torch.int64))
        log_probs = _poison(torch.empty(batch, n1, dtype=acc))
        code = DTYPE_CODES[target_logits.dtype]
        draft_code = DTYPE_CODES[draft_probs.dtype] if draft_probs is not None else 0
        ws = _workspace(self.lib.osm_host_rejection_workspace_bytes(code, batch, n1 - 1, vocab,
                                                                     int(min_log_ratio is not None), limits.num_sms))
        self._check(self.lib.osm_host_rejection_sample(code, draft_code, _ptr(target_logits), batch, n1 - 1, vocab,
                                                       _ptr(draft_token_ids), _ptr(draft_probs),
                                                       _ptr(num_draft_tokens), _ptr(temperature), _ptr(min_log_ratio),
                                                       _ptr(uniforms), _ptr(tokens), _ptr(accepted), _ptr(log_probs),
                                                       _ptr(ws), limits.num_sms))
        return tokens, accepted, log_probs

    def token_logprobs(self, x, token_ids, top_n=0, temperature=1.0, token_values=None, limits=Limits()):
        """Rows of a contiguous 2-d x; int64 (rows,) token ids, token_values (rows,) in the accumulation
        dtype or None. Returns the op's seven outputs; top_ids and top_log_probs stay poisoned when the
        kernel does not select (the binding's softmax_topk fills them then)."""
        assert x.is_contiguous() and x.dim() == 2
        rows, n = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        per_row = [_poison(torch.empty(rows, dtype=acc)) for _ in range(4)]  # log_probs, max, sumexp, entropy
        rank = _poison(torch.empty(rows, dtype=torch.int64))
        top_ids = _poison(torch.empty(rows, top_n, dtype=torch.int64))
        top_lp = _poison(torch.empty(rows, top_n, dtype=acc))
        self._check(self.lib.osm_host_token_logprobs(DTYPE_CODES[x.dtype], _ptr(x), rows, n, _ptr(token_ids),
                                                     _ptr(token_values), top_n, 1.0 / temperature, _ptr(per_row[0]),
                                                     _ptr(rank), _ptr(top_ids), _ptr(top_lp), _ptr(per_row[1]),
                                                     _ptr(per_row[2]), _ptr(per_row[3]), limits.num_sms))
        return per_row[0], rank, top_ids, top_lp, per_row[1], per_row[2], per_row[3]

    def cross_entropy_backward(self, x, max, sumexp, target, p_scale, target_scale, smooth_scale=None, weight=None,
                               limits=Limits(), return_error=False, in_place=False):
        """Rows of a contiguous 2-d x (a view into a larger storage keeps its offset, so rows may start
        off a 16-byte boundary); the per-row vectors and weight contiguous, in the accumulation dtype.
        With return_error, returns (out, error flag): the flag is 1 when a target was out of range.
        in_place: out is x itself (cross_entropy_backward_), overwritten."""
        assert x.dim() == 2 and x.is_contiguous()
        rows, n = x.shape
        out = x if in_place else _poison(torch.empty_like(x))
        error = torch.zeros(1, dtype=torch.int32)
        self._check(self.lib.osm_host_cross_entropy_backward(DTYPE_CODES[x.dtype], _ptr(x), _ptr(max), _ptr(sumexp),
                                                             _ptr(target), _ptr(p_scale), _ptr(target_scale),
                                                             _ptr(smooth_scale),
                                                             _ptr(weight), _ptr(out), rows, n, _ptr(error),
                                                             limits.num_sms, limits.max_smem_per_block))
        return (out, int(error.item())) if return_error else out

    def token_logprobs_backward(self, grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy,
                                temperature=1.0, limits=Limits(), return_error=False, in_place=False):
        """As cross_entropy_backward: rows of a contiguous 2-d x, per-row vectors contiguous in the
        accumulation dtype; grad_entropy may be None. With return_error, returns (out, error flag);
        in_place: out is x itself (token_logprobs_backward_), overwritten."""
        assert x.dim() == 2 and x.is_contiguous()
        rows, n = x.shape
        out = x if in_place else _poison(torch.empty_like(x))
        error = torch.zeros(1, dtype=torch.int32)
        self._check(self.lib.osm_host_token_logprobs_backward(
            DTYPE_CODES[x.dtype], _ptr(x), _ptr(token_ids), _ptr(grad_log_probs), _ptr(grad_entropy), _ptr(max),
            _ptr(sumexp), _ptr(entropy), float(temperature), _ptr(out), rows, n, _ptr(error), limits.num_sms,
            limits.max_smem_per_block))
        return (out, int(error.item())) if return_error else out

    def distillation_forward(self, student, teacher, target=None, kind=0, beta=0.5, temperature=1.0, hard_weight=0.0,
                             ignore_index=-100, limits=Limits(), return_error=False):
        """Contiguous 2-d student and teacher rows; target int64 (rows,) or None; kind 0 kl, 1
        reverse_kl, 2 jsd. Returns (loss, stats) (and the error flag with return_error)."""
        assert student.dim() == 2 and student.is_contiguous() and teacher.is_contiguous()
        rows, n = student.shape
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss = _poison(torch.empty(rows, dtype=acc))
        stats = _poison(torch.empty(rows, 7, dtype=acc))
        error = torch.zeros(1, dtype=torch.int32)
        self._check(self.lib.osm_host_distillation_forward(
            DTYPE_CODES[student.dtype], _ptr(student), _ptr(teacher), _ptr(target), kind, float(beta),
            float(temperature), float(hard_weight), ignore_index, _ptr(loss), _ptr(stats), rows, n, _ptr(error),
            limits.num_sms, limits.max_smem_per_block))
        return (loss, stats, int(error.item())) if return_error else (loss, stats)

    def distillation_backward(self, grad_loss, student, teacher, target, stats, kind=0, beta=0.5, temperature=1.0,
                              hard_weight=0.0, ignore_index=-100, limits=Limits(), return_error=False,
                              in_place=False):
        """The gradient with respect to student (a new tensor, or student itself with in_place)."""
        assert student.dim() == 2 and student.is_contiguous() and teacher.is_contiguous()
        rows, n = student.shape
        out = student if in_place else _poison(torch.empty_like(student))
        error = torch.zeros(1, dtype=torch.int32)
        self._check(self.lib.osm_host_distillation_backward(
            DTYPE_CODES[student.dtype], _ptr(student), _ptr(teacher), _ptr(target), kind, float(beta),
            float(temperature), float(hard_weight), ignore_index, _ptr(grad_loss), _ptr(stats), _ptr(out), rows, n,
            _ptr(error), limits.num_sms, limits.max_smem_per_block))
        return (out, int(error.item())) if return_error else out

    def masked_forward(self, x, mask=None, causal=False, causal_offset=0, scale=1.0, log=False, out_dtype=None,
                       limits=Limits()):
        """masked_softmax_forward over the last dim of a contiguous x (a view into a larger storage
        keeps its offset); mask: None, bool or floating, any shape that broadcasts to x (an additive
        one is converted to the accumulation dtype), read through its broadcast strides."""
        assert x.is_contiguous() and x.dim() >= 1
        n = x.shape[-1]
        rows = x.numel() // n if n else 0
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = _poison(torch.empty(x.shape, dtype=out_dtype or x.dtype))
        kind, m = 0, None
        sizes = strides = (ctypes.c_int64 * 1)()
        dims, col = 0, 0
        if mask is not None:
            kind = 1 if mask.dtype == torch.bool else 2
            m = mask if kind == 1 else mask.to(acc)
            m = m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape))
            if m.shape[-1] > 1 and m.stride(-1) != 1:
                m = m.contiguous()
            self._mask_keepalive = m
            e = m.expand(x.shape)
            dims = x.dim() - 1
            sizes = (ctypes.c_int64 * max(dims, 1))(*x.shape[:-1])
            strides = (ctypes.c_int64 * max(dims, 1))(*e.stride()[:-1])
            col = e.stride(-1)
        causal_rows = x.shape[-2] if causal else 0
        self._check(self.lib.osm_host_masked_forward(DTYPE_CODES[x.dtype], DTYPE_CODES[y.dtype], _ptr(x), _ptr(y),
                                                     rows, n, scale, int(log), kind, _ptr(m), dims, sizes, strides,
                                                     col, causal_rows, causal_offset, limits.num_sms,
                                                     limits.max_smem_per_block))
        return y
