"""Is decoding's matmul rate a limit of this CPU, or of the library computing it?

    .venv/bin/python benchmarks/decode_gemm.py --rows 32 64 224 --threads 2

A decode step multiplies every row's hidden state by each of the backbone's linear weights:
matrices of a few to 64 rows against weights of 576-1536 columns (SmolLM2-135M), the shapes
where a CPU's matmul rate is furthest from its peak. For the model's own weight shapes
(`--model`, default the embedded SmolLM2-135M: 30 layers x q, k, v, o, gate, up, down) and
each row count, it times one decode step's worth of base matmuls (every layer's seven, random
float32 weights, the median of `--reps`) computed

- `torch`: `F.linear`, what the model runs (MKL's sgemm in torch's CPU build);
- `onednn-packed`: oneDNN with the weight pre-packed once (`torch.ops.mkldnn._linear_pointwise`,
  what `grpo.logprobs.float32_linear` runs for the LM head);
- `openblas`: numpy's BLAS (the wheels ship OpenBLAS), on the same memory, weight pre-transposed;
- `torch-fused`: q/k/v as one matmul and gate/up as one (4 matmuls per layer instead of 7),
  the fusion inference engines apply;

and prints each one's GFLOP/s and ms per decode step. Whichever is fastest is the decode
floor at this batch on this machine; if all sit at about the same rate, the rate is the CPU's
at these shapes, not a library's choice. Reported in docs/benchmarks.md ("Session 7").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import timed  # noqa: E402
from roofline import Shape  # noqa: E402


def model_shape(spec: str) -> Shape:
    from grpo.models import resolve_model_path

    config = json.loads((Path(resolve_model_path(spec)) / "config.json").read_text())
    return Shape.from_config(argparse.Namespace(**config))


def kernels(shape: Shape, rows: int, seed: int = 0) -> dict[str, object]:
    """name -> a function computing one decode step's base matmuls at ``rows`` rows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    linears = shape.linears()
    weights = [torch.randn(o, i, generator=g) / i ** 0.5 for _ in range(shape.layers) for i, o in linears]
    x = {i: torch.randn(rows, i, generator=g) for i, _ in linears}
    out = {"torch": lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in weights]}
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available():
        packed = [(w.shape[1], torch.ops.mkldnn._reorder_linear_weight(w)) for w in weights]
        out["onednn-packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x[i], p, None, "none", [], "")
                                        for i, p in packed]
    try:
        import numpy as np

        xn = {i: t.numpy() for i, t in x.items()}
        wt = [np.ascontiguousarray(w.numpy().T) for w in weights]
        out["openblas"] = lambda: [xn[w.shape[0]] @ w for w in wt]
    except ImportError:
        pass
    (q, kv, _, o, gate, up, down) = linears
    fused_shapes = [(q[0], q[1] + 2 * kv[1]), o, (gate[0], gate[1] + up[1]), down]
    fused = [torch.randn(b, a, generator=g) / a ** 0.5 for _ in range(shape.layers) for a, b in fused_shapes]
    out["torch-fused"] = lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in fused]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 224])
    parser.add_argument("--threads", type=int, default=1, help="torch's and OpenBLAS's threads")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # OpenBLAS reads it once, when numpy loads
    import torch

    torch.set_num_threads(args.threads)
    shape = model_shape(args.model)
    flops_per_row = shape.layers * shape.layer_linear_flops()
    names = ("torch", "onednn-packed", "openblas", "torch-fused")
    print(f"# base matmuls of one decode step: {shape.layers} layers x {len(shape.linears())} linears, "
          f"{flops_per_row / 1e6:.0f} MFLOP per row; float32; {args.threads} thread(s); torch {torch.__version__}")
    print("| rows | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for rows in args.rows:
        cells = {}
        for name, fn in kernels(shape, rows).items():
            t = timed(fn, args.reps)
            cells[name] = f"{flops_per_row * rows / t / 1e9:.0f} GF/s, {t * 1e3:.0f} ms"
        print(f"| {rows} | " + " | ".join(cells.get(k, "-") for k in names) + " |", flush=True)


if __name__ == "__main__":
    main()
