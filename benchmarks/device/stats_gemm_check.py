"""Is Σ XᵀX from the GPU's GEMMs positive semi-definite? (issue 17: Qwen2.5-14B's layer 0 failed.)

Half-precision activations with one dominant direction (as a Qwen2 layer's v_proj bias gives every
token) and low-rank variation around it; the statistic accumulated over chunks as the emulator does,
with TF32 on and off, against an fp64 reference. Prints the smallest eigenvalue of each, relative to
the mean eigenvalue (the whitening's shift ladder tolerates down to -0.1) and to the largest.

    python benchmarks/device/stats_gemm_check.py
"""

import json

import torch


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    n, rank, chunks, tokens = 5120, 300, 8, 4096
    c = torch.randn(n, device=dev, generator=gen)
    basis = torch.randn(rank, n, device=dev, generator=gen)
    sums = {k: torch.zeros(n, n, device=dev, dtype=torch.float64 if k == "fp64" else torch.float32)
            for k in ("tf32", "fp32", "fp64")}
    for _ in range(chunks):
        x = c + 0.02 * torch.randn(tokens, rank, device=dev, generator=gen) @ basis
        x = (x / x.pow(2).mean(-1, keepdim=True).sqrt()).bfloat16()
        xd = x.float()
        for mode, allow in (("tf32", True), ("fp32", False)):
            torch.backends.cuda.matmul.allow_tf32 = allow
            sums[mode].add_(xd.T @ xd)
        torch.backends.cuda.matmul.allow_tf32 = False
        x64 = x.double()
        sums["fp64"].add_(x64.T @ x64)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ref = sums["fp64"]
    for mode, s in sums.items():
        s64 = s.double()
        s64 = (s64 + s64.T) / 2
        ev = torch.linalg.eigvalsh(s64)
        mean = float(ev.mean())
        out[mode] = {"min_over_mean": float(ev[0]) / mean, "max_over_mean": float(ev[-1]) / mean,
                     "max_abs_err_over_max": float((s64 - ref).abs().max() / ref.abs().max())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
