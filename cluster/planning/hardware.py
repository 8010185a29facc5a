"""The devices and links a plan can be made for, each number with its source.

Bandwidths are per GPU and per direction (the datasheets' NVLink figure is both directions together, halved
here). ``dense_bf16_flops`` is the dense (not 2:4-sparse) bf16 tensor-core rate. Link latencies are the
order of one small NCCL all-to-all step, not a datasheet figure: they only matter for decode at small batch.
``cpu`` has no entry: its numbers are measured on this machine (calibrate.py)."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    dense_bf16_flops: float  # FLOP/s
    nvlink_bw: float  # bytes/s per direction (0: no NVLink, PCIe only)
    nic_bw: float  # bytes/s per GPU per direction (the node's NICs divided by its GPUs)
    source: str


GPUS = {g.name: g for g in (
    Gpu("H100", 80 * GB, 3.35e12, 989e12, 450 * GB, 50 * GB,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 80 GB HBM3, 3.35 TB/s, BF16 1979 TFLOPS with sparsity, "
        "NVLink 900 GB/s); DGX H100 user guide (8x ConnectX-7 400 Gb/s for 8 GPUs)"),
    Gpu("H200", 141 * GB, 4.8e12, 989e12, 450 * GB, 50 * GB,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: 141 GB HBM3e, 4.8 TB/s, BF16 1979 TFLOPS with sparsity, "
        "NVLink 900 GB/s); HGX H200 with one 400 Gb/s NIC per GPU"),
    Gpu("B200", 180 * GB, 8.0e12, 2.25e15, 900 * GB, 50 * GB,
        "NVIDIA DGX B200 datasheet (1,440 GB HBM3e and 64 TB/s for 8 GPUs; 72 PFLOPS FP8 training = 2.25 "
        "PFLOPS dense BF16 per GPU; NVLink 5 1.8 TB/s per GPU; 8x ConnectX-7 400 Gb/s)"),
    Gpu("A100-80GB", 80 * GB, 2.039e12, 312e12, 300 * GB, 25 * GB,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense, NVLink "
        "600 GB/s); DGX A100 (8x ConnectX-6 200 Gb/s for 8 GPUs)"),
    Gpu("L40S", 48 * GB, 864 * GB, 362e12, 0.0, 25 * GB,
        "NVIDIA L40S datasheet (48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS dense / 733 with sparsity, PCIe "
        "Gen4 x16, no NVLink); a 200 Gb/s NIC per GPU assumed"),
)}


@dataclass(frozen=True)
class Link:
    name: str
    bw: float  # bytes/s per GPU per direction; 0: the GPU's own figure (NVLink)
    latency_s: float
    source: str


LINKS = {link.name: link for link in (
    Link("nvlink", 0.0, 8e-6, "the GPU's NVLink (table above); ~8 us: nccl-tests alltoall, 8x H100, small "
                               "messages"),
    Link("ib400", 50 * GB, 15e-6, "InfiniBand NDR 400 Gb/s per GPU (ConnectX-7); ~15 us: nccl-tests alltoall "
                                  "across nodes, small messages"),
    Link("roce100", 12.5 * GB, 25e-6, "RoCE 100 Gb/s per GPU; ~25 us (Ethernet adds a few us per hop to IB)"),
    Link("pcie", 25 * GB, 12e-6, "PCIe Gen4 x16 (32 GB/s raw, ~25 GB/s achieved by host-staged copies), "
                                 "same node without NVLink"),
)}

GPU_NAMES = tuple(GPUS) + ("cpu",)


def intra_node_link(gpu: Gpu) -> Link:
    """How two GPUs of one node talk: NVLink where the GPU has it, else PCIe."""
    if gpu.nvlink_bw:
        return Link("nvlink", gpu.nvlink_bw, LINKS["nvlink"].latency_s, LINKS["nvlink"].source)
    return LINKS["pcie"]


def inter_node_link(gpu: Gpu, name: str) -> Link:
    """The link between nodes named by ``--link`` (nvlink: a rack-scale NVLink domain)."""
    link = LINKS[name]
    return intra_node_link(gpu) if name == "nvlink" else link
