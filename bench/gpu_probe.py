"""Device probe (not part of the suite): which grouped-matmul paths this torch offers on the GPU and what they cost
for SmolLM2-shaped FFN experts, fp32 and bf16. Run: `python -m bench.gpu_probe`."""
from __future__ import annotations

import torch

from bench import common


def main() -> None:
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    e, d, f = 8, 576, 1536
    for dtype in (torch.float32, torch.bfloat16):
        for n in (64, 512, 2048):
            x = torch.randn(n * 2, d, device=dev, dtype=dtype)
            w = torch.randn(e, d, 2 * f, device=dev, dtype=dtype)
            offs = torch.linspace(0, n * 2, e + 1, device=dev)[1:].round().to(torch.int32)
            ends = offs.tolist()

            def loop() -> list[torch.Tensor]:
                starts = [0, *ends[:-1]]
                return [x[a:b] @ w[i] for i, (a, b) in enumerate(zip(starts, ends))]

            runs = {"loop": loop}
            try:
                torch._grouped_mm(x, w, offs=offs)
                runs["grouped_mm"] = lambda: torch._grouped_mm(x, w, offs=offs)
            except Exception as err:  # not offered for this dtype/device: say so
                print(dtype, n, "grouped_mm unavailable:", str(err).splitlines()[0][:100])
            t = common.interleave(runs, reps=30, warmup=3, sync=torch.cuda.synchronize)
            print(dtype, n, {k: round(common.median(v) * 1e6, 1) for k, v in t.items()}, flush=True)


if __name__ == "__main__":
    main()
