"""GPU specs the planner's step-time and memory models read: peak dense tensor throughput per precision, HBM size
and bandwidth, NVLink domain size and bandwidth, and the per-GPU network bandwidth between NVLink domains.

All throughputs are DENSE (vendor datasheets print the 2:4-sparse figure first; dense is half of it). Bandwidths
are per GPU, per direction, in GB/s (1e9 bytes), because ring collectives move each byte once per direction.
Sources (datasheets as published by NVIDIA):
- H100 SXM5: "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979 TFLOPS / FP8 3,958 TFLOPS *with sparsity*,
  80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (bidirectional); HGX H100 = 8 GPUs per NVLink domain; DGX H100 has
  8x ConnectX-7 400 Gb/s (one NIC per GPU = 50 GB/s). No FP4 tensor cores.
- H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet: same tensor throughput as H100 SXM, 141 GB HBM3e at
  4.8 TB/s, NVLink 900 GB/s; HGX H200 8 GPUs; 400 Gb/s per GPU.
- B200 (HGX B200 / DGX B200): "NVIDIA DGX B200" datasheet: 72 PFLOPS FP8 training and 144 PFLOPS FP4 inference
  for 8 GPUs (sparse) -> per GPU 4.5 / 9 PFLOPS dense; BF16 2.25 PFLOPS dense; 1,440 GB HBM3e (180 GB per GPU)
  at 64 TB/s (8 TB/s per GPU); NVLink 5 at 1.8 TB/s bidirectional; 8 GPUs per NVLink domain; 8x ConnectX-7
  400 Gb/s.
- GB200 (GB200 NVL72): "NVIDIA GB200 NVL72" datasheet: 72 GPUs, FP4 1,440 PFLOPS / FP8 720 PFLOPS / BF16 360
  PFLOPS (sparse) -> per GPU 10 / 5 / 2.5 PFLOPS dense; up to 13.4 TB HBM3e at 576 TB/s (186 GB and 8 TB/s per
  GPU); NVLink 130 TB/s over 72 GPUs (1.8 TB/s bidirectional per GPU); one 400 Gb/s ConnectX-7 per GPU between
  racks.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    compute_capability: float = Field(gt=0)  # CUDA compute capability: MXFP8 and NVFP4 GEMMs need >= 10.0 (Blackwell)
    bf16_tflops: float = Field(gt=0)  # peak dense BF16 tensor-core TFLOP/s
    fp8_tflops: Optional[float] = Field(None, gt=0)  # peak dense FP8 (per-tensor/blockwise; MXFP8 on Blackwell)
    fp4_tflops: Optional[float] = Field(None, gt=0)  # peak dense FP4 (NVFP4); None: no FP4 GEMMs (Hopper)
    hbm_gb: float = Field(gt=0)  # HBM capacity, GB (1e9 bytes), as the datasheet prints it
    hbm_tb_s: float = Field(gt=0)  # HBM bandwidth, TB/s
    nvlink_domain: int = Field(ge=1)  # GPUs that reach each other over NVLink (one HGX board, one NVL72 rack)
    nvlink_gb_s: float = Field(gt=0)  # NVLink bandwidth per GPU per direction, GB/s
    network_gb_s: float = Field(gt=0)  # bandwidth per GPU per direction between NVLink domains, GB/s

    def peak_tflops(self, fmt: str) -> float:
        """Peak dense TFLOP/s of a GEMM in number format `fmt` (bf16/fp32 run on the BF16 path here)."""
        if fmt in ("bf16", "fp32"):
            return self.bf16_tflops
        if fmt not in ("fp8", "mxfp8", "nvfp4"):
            raise ValueError(f"unknown number format {fmt!r}; known: bf16, fp32, fp8, mxfp8, nvfp4")
        # MXFP8 and NVFP4 are Blackwell block-scaled formats (TE: MXFP8BlockScaling / NVFP4BlockScaling need
        # compute capability >= 10.0); Hopper's FP8 is per-tensor or blockwise scaled (Float8CurrentScaling /
        # Float8BlockScaling).
        blackwell = self.compute_capability >= 10.0
        value = {"fp8": self.fp8_tflops, "mxfp8": self.fp8_tflops if blackwell else None,
                 "nvfp4": self.fp4_tflops if blackwell else None}[fmt]
        if value is None:
            raise ValueError(f"{self.name} has no {fmt} tensor cores (see parallel/gpus.py); use a precision recipe "
                             f"it supports ({', '.join(self.formats())})")
        return value

    def formats(self) -> list[str]:
        blackwell = self.compute_capability >= 10.0
        return (["bf16"] + (["fp8"] if self.fp8_tflops else []) + (["mxfp8"] if self.fp8_tflops and blackwell else [])
                + (["nvfp4"] if self.fp4_tflops and blackwell else []))


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec(name="H100 SXM", compute_capability=9.0, bf16_tflops=989.5, fp8_tflops=1979.0, fp4_tflops=None, hbm_gb=80.0,
                    hbm_tb_s=3.35, nvlink_domain=8, nvlink_gb_s=450.0, network_gb_s=50.0),
    "h200": GPUSpec(name="H200 SXM", compute_capability=9.0, bf16_tflops=989.5, fp8_tflops=1979.0, fp4_tflops=None, hbm_gb=141.0,
                    hbm_tb_s=4.8, nvlink_domain=8, nvlink_gb_s=450.0, network_gb_s=50.0),
    "b200": GPUSpec(name="B200 (HGX)", compute_capability=10.0, bf16_tflops=2250.0, fp8_tflops=4500.0, fp4_tflops=9000.0, hbm_gb=180.0,
                    hbm_tb_s=8.0, nvlink_domain=8, nvlink_gb_s=900.0, network_gb_s=50.0),
    "gb200": GPUSpec(name="GB200 (NVL72)", compute_capability=10.0, bf16_tflops=2500.0, fp8_tflops=5000.0, fp4_tflops=10000.0, hbm_gb=186.0,
                     hbm_tb_s=8.0, nvlink_domain=72, nvlink_gb_s=900.0, network_gb_s=50.0),
}


def get_gpu(name: str) -> GPUSpec:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    return GPUS[key]
