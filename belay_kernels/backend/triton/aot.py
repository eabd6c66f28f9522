"""Ahead-of-time compilation of every kernel for a GPU architecture, with no GPU, and
what its PTX says about memory traffic.

``compile_case(case, arch)`` builds the kernel as the JIT would for contiguous,
16-byte-aligned tensors (pointers carry ``tt.divisibility = 16``; the sizes carry no
divisibility, the worst case). ``analyse(...)`` reads the PTX:

- the fast path is the unpredicated global loads and stores (the unmasked full
  blocks; the masked tail block's accesses are predicated);
- their widths (128-bit = ``.v4.b32`` or ``.v2.b64``), and the bytes they move per
  thread, which must equal one load per input and one store per output element;
- ``ld.local`` / ``st.local`` instructions, and ptxas' registers, stack frame and
  spill bytes (from the ptxas that ships with Triton).

Used by tests/test_triton_ptx.py and bench/triton_ptx_table.py.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ... import methods
from . import _launch
from .multi_ema import _multi_ema_update_kernel

ARCHS = (80, 90)
THREADS = 32 * _launch.NUM_WARPS

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# The bookkeeping parameters, the same in every kernel that has them. A scalar of the
# method table passes as ``<name>`` (a count), ``<name>_bits`` (a rate's float64 bits, as
# every ``*_bits`` parameter) and ``<name>_ptr`` (the same scalar on the device).
_BOOKKEEPING_TYPES = {
    "n": "i32",
    "num_tensors": "i32",
    "size": "i32",
    "first_step": "i32",
    "every": "i32",
    "skipped_ptr": "*i64",
    "step_ptr": "*i64",
    "skip_ptr": "*fp32",
    "table_ptr": "*i64",
    "owner_ptr": "*i32",
}
_SCALAR_TYPES = {"rate": ("i64", "*fp32"), "count": ("i64", "*i64")}


def _scalar_type(name: str) -> str | None:
    if name in _BOOKKEEPING_TYPES:
        return _BOOKKEEPING_TYPES[name]
    if name.endswith("_bits"):
        return "i64"
    for scalar in (s for m in (*methods.METHODS, methods.MULTI_EMA) for s in m.scalars):
        host, device = _SCALAR_TYPES.get(scalar.kind, (None, None))
        if name == scalar.name:
            return host
        if name == f"{scalar.name}_ptr":
            return device
    return None


# The flags that the graph-capturable configuration turns on (with every ``*_FROM_PTR``):
# the decay warmup, the step gate, the skip flag and a skipped counter. The common call
# has none of them: host scalars, no gate, non-finite skip without a counter.
_GRAPH_ONLY_FLAGS = ("WARMUP", "HAS_STEP", "HAS_SKIP", "HAS_SKIPPED")


def scalar_pointers(kernel) -> list[str]:
    """The kernel's pointers to one device value: each scalar that a ``*_FROM_PTR`` flag
    reads from the device, and the gate's step and skip flag."""
    names = kernel.arg_names
    return [
        name
        for name in names
        if name in ("step_ptr", "skip_ptr")
        or (name.endswith("_ptr") and f"{name[:-4].upper()}_FROM_PTR" in names)
    ]


@dataclass(frozen=True)
class Method:
    name: str
    kernel: object  # one kernel, flat or list by its IS_LIST flag
    inputs: tuple[str, ...]  # tensor roles read
    outputs: tuple[str, ...]  # tensor roles written
    bits_only: bool = False  # swap: sees integer views
    profiles: int = 0  # multi-EMA: K shadows in tuple arguments (roles repeat K times)


def _table_method(method: methods.Method) -> Method:
    """A method of the table, its kernel found by name: ``_<op>kernel`` in the module
    named after the method."""
    module = importlib.import_module(f".{method.name}", __package__)
    return Method(
        method.op,
        getattr(module, f"_{method.op}kernel"),
        method.read,
        method.written,
        bits_only=method.exact,
    )


METHODS = tuple(_table_method(m) for m in methods.METHODS)


@dataclass(frozen=True)
class Case:
    method: Method
    weights_dtype: torch.dtype
    shadow_dtype: torch.dtype
    foreach: bool = False
    graph: bool = False  # the graph-capturable configuration: every flag on

    @property
    def kernel(self):
        return self.method.kernel

    def flag(self, name: str) -> bool:
        if name == "SKIP_NONFINITE":
            return True
        if name in _GRAPH_ONLY_FLAGS or name.endswith("_FROM_PTR"):
            return self.graph
        raise KeyError(name)

    def role_dtype(self, role: str) -> torch.dtype:
        # two-point: out is like the weights, the snapshot has the "shadow" dtype
        dtype = self.shadow_dtype if role in ("shadow", "snapshot") else self.weights_dtype
        if self.method.bits_only:
            dtype = _INT_OF_WIDTH[dtype.itemsize]
        return dtype

    @property
    def block(self) -> int:
        roles = set(self.method.inputs) | set(self.method.outputs)
        return _launch.block_size(*(self.role_dtype(role) for role in roles))

    @property
    def elements_per_thread(self) -> int:
        return self.block // THREADS

    def bytes_per_element(self, roles) -> int:
        return sum(self.role_dtype(role).itemsize for role in roles)

    @property
    def label(self) -> str:
        pair = "/".join(
            str(d).removeprefix("torch.") for d in (self.weights_dtype, self.shadow_dtype)
        )
        variant = "foreach" if self.foreach else "flat"
        if self.graph:
            variant += "+graph"
        return f"{self.method.name} {variant} {pair}"


def fast_cases(foreach: bool = False) -> list[Case]:
    """Every method and dtype pair it supports, in the common configuration."""
    from ...methods import DTYPE_PAIRS
    from ...reference import swap_supported

    return [
        Case(m, w, s, foreach)
        for m in METHODS
        for w, s in DTYPE_PAIRS
        if not m.bits_only or swap_supported(w, s)
    ]


MULTI_EMA_PROFILES = (1, 3, 8)


def multi_ema_method(k: int) -> Method:
    """The multi-EMA kernel with ``k`` shadows: K shadow reads and writes, one weights read."""
    return Method(
        f"multi_ema_update_x{k}",
        _multi_ema_update_kernel,
        ("shadow",) * k + ("weights",),
        ("shadow",) * k,
        profiles=k,
    )


def multi_ema_cases(foreach: bool = False) -> list[Case]:
    """The multi-EMA kernel for each K of MULTI_EMA_PROFILES and every dtype pair."""
    from ...methods import DTYPE_PAIRS

    return [
        Case(multi_ema_method(k), w, s, foreach) for k in MULTI_EMA_PROFILES for w, s in DTYPE_PAIRS
    ]


def multi_ema_graph_cases() -> list[Case]:
    """The multi-EMA kernel with every decay a device tensor and a skipped counter."""
    pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32))
    return [
        Case(multi_ema_method(k), w, s, False, graph=True)
        for k in MULTI_EMA_PROFILES
        for w, s in pairs
    ]


def gated(method: Method) -> bool:
    """Whether the kernel takes a StepGate (device_step), so a captured graph can replay it."""
    return "step_ptr" in method.kernel.arg_names


def graph_cases() -> list[Case]:
    """The graph-capturable configuration of the methods whose kernels take a gate."""
    pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32))
    return [Case(m, w, s, False, graph=True) for m in METHODS if gated(m) for w, s in pairs]


def _signature(case: Case):
    fn = case.kernel
    signature, constexprs, attrs = {}, {}, {}
    roles_dtype = {f"{r}_ptr": case.role_dtype(r) for r in ("shadow", "weights", "out", "snapshot")}
    compute = _launch.compute_dtype(case.weights_dtype, case.shadow_dtype)
    k = case.method.profiles
    scalar_dtype = torch.float64 if compute == tl.float64 else torch.float32
    tuples = {
        "shadow_ptrs": ("*" + _TRITON_TYPES[case.role_dtype("shadow")],) * k,
        "words": ("i64",) * (2 * k),
        "decay_ptrs": ("*" + _TRITON_TYPES[scalar_dtype],) * k,
    }
    tuple_constexprs = {
        "DECAY_FROM_PTR": (case.flag("DECAY_FROM_PTR"),) * k,
        "COMPUTES": (compute,) * k,
    }
    for index, name in enumerate(fn.arg_names):
        if name in tuples and k:
            signature[name] = tuples[name]
            for sub, kind in enumerate(tuples[name]):
                if kind.startswith("*"):
                    attrs[(index, sub)] = [["tt.divisibility", 16]]
            continue
        if name in tuple_constexprs and k:
            signature[name] = "constexpr"
            constexprs[name] = tuple_constexprs[name]
            continue
        if name in roles_dtype:
            signature[name] = "*" + _TRITON_TYPES[roles_dtype[name]]
        elif scalar_type := _scalar_type(name):
            signature[name] = scalar_type
        else:
            value = {
                "COMPUTE": compute,
                "BLOCK": case.block,
                "ALIGNED": True,
                "INVERSE": False,
                "IS_LIST": case.foreach,
                "PACKED": case.weights_dtype != case.shadow_dtype,
            }.get(name)
            if value is None:
                value = case.flag(name)
            signature[name] = "constexpr"
            constexprs[name] = value
        if signature[name].startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_case(case, arch: int):
    """Compile a Case or a FusedCase (which knows its own signature)."""
    signature, constexprs, attrs = _signature(case) if isinstance(case, Case) else case.signature()
    source = ASTSource(case.kernel, signature, constexprs, attrs)
    options = {"num_warps": _launch.NUM_WARPS}
    if isinstance(case, FusedCase):
        options["maxnreg"] = case.max_registers
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


_GLOBAL = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global(\.[\w:]+)*?\s")
_WIDTH = re.compile(r"\.(v(\d))?\.?[bfsu](\d+)\s")


def _access_bits(line: str) -> int:
    op = line.split()[1] if line.lstrip().startswith("@") else line.split()[0]
    parts = op.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    width = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
    return vec * width


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes, from ``ptxas -v`` (Triton's own ptxas)."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [ptxas, "-v", f"-arch={arch}", path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr

    def number(pattern):
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
    }


@dataclass
class PtxReport:
    case: Case
    arch: int
    fast_loads: list[int]  # bits of each unpredicated global load (the fast path)
    fast_stores: list[int]
    local_ops: int  # ld.local / st.local instructions
    shared_ops: int  # ld/st.shared (layout conversions, reductions)
    usage: dict[str, int]

    @property
    def streaming_loads(self) -> list[int]:
        return [b for b in self.fast_loads if b == 128]

    @property
    def vector_bits(self) -> int:
        widths = set(self.streaming_loads) | set(self.fast_stores)
        return min(widths) if widths else 0

    @property
    def load_bytes_per_element(self) -> float:
        return sum(self.streaming_loads) / 8 / self.case.elements_per_thread

    @property
    def store_bytes_per_element(self) -> float:
        return sum(self.fast_stores) / 8 / self.case.elements_per_thread

    @property
    def scalar_loads(self) -> int:
        """Per-program loads of one value: table entries, device scalars, step, skip flag.
        (Any streaming load that is not 128-bit also lands here, and then the streaming
        bytes per element fall short of the minimum.)"""
        return len(self.fast_loads) - len(self.streaming_loads)


def analyse(case, arch: int) -> PtxReport:
    ptx = compile_case(case, arch).asm["ptx"]
    loads, stores = [], []
    for line in ptx.splitlines():
        match = _GLOBAL.match(line)
        if match and not match.group(1):
            (loads if match.group(2) == "ld" else stores).append(_access_bits(line))
    local_ops = len(re.findall(r"\b(ld|st)\.local\b", ptx))
    shared_ops = len(re.findall(r"\b(ld|st)\.shared\b", ptx))
    return PtxReport(case, arch, loads, stores, local_ops, shared_ops, ptxas_usage(ptx))


# --- the fused optimizer steps (optimizers.py) ------------------------------------------

_OPTIMIZER_STATE = {
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "sgd": ("momentum_buffer",),
}


@dataclass(frozen=True)
class FusedCase:
    """One fused optimizer kernel (always a tensor-list launch) with every option that adds
    traffic or registers on: Adam with AMSGrad, L2 decay and maximize; SGD with momentum
    (not its first step), nesterov and decay; both with GradScaler's grad_scale (the
    gradient is written back) and found_inf, and a skipped counter."""

    optimizer: str  # "adam" or "sgd"
    average: str  # the kernel's: "none", "lerp" (EMA, SWA), "belay", "poster"
    profiles: int  # shadows per tensor
    weights_dtype: torch.dtype
    shadow_dtype: torch.dtype
    foreach: bool = True
    graph: bool = False

    @property
    def kernel(self):
        from . import optimizers

        return getattr(optimizers, f"_{self.optimizer}_average_kernel")

    @property
    def max_registers(self) -> int:
        from . import optimizers

        return optimizers.MAX_REGISTERS

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("param", "grad", *_OPTIMIZER_STATE[self.optimizer]) + ("shadow",) * self.profiles

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("param", "grad", *_OPTIMIZER_STATE[self.optimizer]) + ("shadow",) * self.profiles

    def role_dtype(self, role: str) -> torch.dtype:
        return self.shadow_dtype if role == "shadow" else self.weights_dtype

    @property
    def block(self) -> int:
        return _launch.block_size(self.weights_dtype, self.shadow_dtype)

    @property
    def elements_per_thread(self) -> int:
        return self.block // THREADS

    def bytes_per_element(self, roles) -> int:
        return sum(self.role_dtype(role).itemsize for role in roles)

    @property
    def label(self) -> str:
        pair = "/".join(
            str(d).removeprefix("torch.") for d in (self.weights_dtype, self.shadow_dtype)
        )
        return f"{self.optimizer}_average_ {self.average}x{self.profiles} {pair}"

    def signature(self):
        fn = self.kernel
        columns = self.inputs
        compute = _launch.compute_dtype(self.weights_dtype, self.shadow_dtype)
        rates = {"none": 1, "lerp": self.profiles, "belay": 2, "poster": 2}[self.average]
        flags = {
            "IS_LIST": True,
            "ALIGNED": True,
            "AMSGRAD": True,
            "WEIGHT_DECAY": True,
            "DECOUPLED": False,
            "MAXIMIZE": True,
            "MOMENTUM": True,
            "FIRST_STEP": False,
            "NESTEROV": True,
            "HAS_FOUND_INF": True,
            "HAS_GRAD_SCALE": True,
            "AVERAGE": self.average,
            "SKIP_NONFINITE": True,
            "HAS_SKIPPED": True,
            "COMPUTE": compute,
            "COMPUTES": (compute,) * self.profiles,
            "BLOCK": self.block,
        }
        types = {
            "ptrs": tuple("*" + _TRITON_TYPES[self.role_dtype(role)] for role in columns),
            "words": ("i64",) * (2 * rates),
            # the optimizer's hyperparameters, two words each (optimizers._decoded)
            "bits": ("i64",) * (2 * (8 if self.optimizer == "adam" else 4)),
            "state_step_ptr": "*fp32",
            "found_inf_ptr": "*fp32",
            "grad_scale_ptr": "*fp32",
        }
        signature, constexprs, attrs = {}, {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in flags:
                signature[name] = "constexpr"
                constexprs[name] = flags[name]
                continue
            signature[name] = types.get(name) or _scalar_type(name)
            if name == "ptrs":
                for sub in range(len(columns)):
                    attrs[(index, sub)] = [["tt.divisibility", 16]]
            elif isinstance(signature[name], str) and signature[name].startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        return signature, constexprs, attrs


def fused_cases() -> list[FusedCase]:
    """Each optimizer with each average the kernels have (EMA with 1 and 3 profiles), for
    fp32 and for bf16 weights with fp32 shadows; fp64 with the K=1 EMA."""
    pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32))
    averages = (("none", 0), ("lerp", 1), ("lerp", 3), ("belay", 1), ("poster", 1))
    cases = [
        FusedCase(optimizer, average, profiles, w, s)
        for optimizer in ("adam", "sgd")
        for average, profiles in averages
        for w, s in pairs
    ]
    return cases + [
        FusedCase(optimizer, "lerp", 1, torch.float64, torch.float64)
        for optimizer in ("adam", "sgd")
    ]
