"""Outputs of every native CPU kernel on fixed inputs, for comparing the builds of each
vector width (``TEAL_CPU_ISA``) bit for bit.  Run as a script it saves them to the path
given; ``test_kernels_cpu.py`` runs it in a subprocess per width, since a process loads
one build."""

import sys

import torch

from teal.kernels import cpu
from teal.model.quant import quantize_int4, quantize_int8

# Output widths with tails of every loop: 16 columns a step, then 8, then single ones.
SPLITS = [(45,), (130, 7, 7), (576, 192, 200)]
# int4 segments must be even (two columns a byte); half widths 23, 29 and 100.
Q_SPLITS = [(46,), (58, 200)]


def outputs() -> dict[str, torch.Tensor]:
    assert cpu.implementation() == "native", "the native CPU kernel did not build"
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the threads split the rows, so their number sets the order
    try:
        return _outputs(torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(old)


def _outputs(g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for k, splits in zip((67, 301, 96), SPLITS):
            x = torch.randn(2, k, generator=g).to(dt)
            wt = (torch.randn(k, sum(splits), generator=g) / k**0.5).to(dt)
            t = torch.full((len(splits),), 0.5)
            out[f"project-{dt}-{k}"] = cpu.sparse_project(x, wt, t, splits)
        x = torch.randn(1, 70, generator=g).to(dt)
        wt = (torch.randn(70, 2 * 40, generator=g) / 70**0.5).to(dt)
        out[f"gate_up-{dt}"] = cpu.sparse_gate_up(x, wt, torch.tensor([0.3, 0.6]))
        for k in (67, 600):  # lm_head: a row-major dot with and without a ragged tail
            w = torch.randn(50, k, generator=g).to(dt)
            out[f"linear-{dt}-{k}"] = cpu.linear(torch.randn(1, k, generator=g).to(dt), w)
    for dt in (torch.float32, torch.bfloat16):
        for k, splits in zip((67, 300), Q_SPLITS):
            w = torch.randn(k, sum(splits), generator=g) / k**0.5
            x = torch.randn(1, k, generator=g).to(dt)
            t = torch.full((len(splits),), 0.4)
            weights = {
                "int8": quantize_int8(w, splits),
                "int4-code": quantize_int4(w, 32, splits, zero_point="code", scale_dtype=dt),
                "int4-offset-fp16": quantize_int4(
                    w, 128, splits, zero_point="offset", scale_dtype=torch.float16
                ),
            }
            for name, qw in weights.items():
                out[f"{name}-{dt}-{k}"] = cpu.quant_project(x, qw, t, splits)
                out[f"{name}-{dt}-{k}-dense"] = cpu.quant_project(x, qw, None, splits)
    return out


if __name__ == "__main__":
    torch.save({"isa": cpu.isa(), "outputs": outputs()}, sys.argv[1])
