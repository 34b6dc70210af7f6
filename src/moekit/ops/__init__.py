"""Ops: reference implementations and the grouped GEMM facade."""
