"""`moekit info`: versions, registered routers and compute backends."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    subparsers.add_parser("info", help="versions, routers and compute backends",
                          description="Versions, registered routers and compute backends of this installation.")


def run(args) -> int:
    import torch

    import moekit
    from moekit.ops.grouped import compute_dtype, cpu_has_native_low_precision, grouped_mm_available

    print(f"moekit {moekit.__version__}, torch {torch.__version__}")
    print(f"routers: {', '.join(moekit.registered_routers())}")
    print(f"grouped GEMM kernel (torch._grouped_mm): {'yes' if grouped_mm_available() else 'no (loop fallback)'}")
    native = cpu_has_native_low_precision()
    print(f"CPU bf16 instructions: {'yes' if native else 'no'}; bf16 expert GEMMs on CPU run in "
          f"{str(compute_dtype(torch.bfloat16, torch.device('cpu'))).replace('torch.', '')}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    return 0
