// CUDA implementations: thin __global__ wrappers around grid_body.h (the bodies the CPU
// tests run over a simulated grid), launched on the current stream, and their
// registration for the CUDA dispatch key. Only the launch and the reduction of the
// skipped counter live here.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "grid_body.h"
#include "op_entries.h"

namespace belay {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kBlocksPerSm = 8;       // enough resident warps to hide DRAM latency
constexpr int64_t kListChunk = 1 << 16;  // elements per block in a tensor-list launch

// Adds the threads' skipped counts to *skipped: a warp sum, then one atomic per warp.
__device__ __forceinline__ void add_skipped(int64_t count, int64_t* skipped) {
  if (skipped == nullptr) return;  // the same for every thread, so the shuffles stay full
  for (int offset = 16; offset > 0; offset /= 2) {
    count += __shfl_down_sync(0xffffffffu, count, offset);
  }
  if ((threadIdx.x & 31) == 0 && count != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(skipped),
              static_cast<unsigned long long>(count));
  }
}

template <typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    flat_kernel(const Op op, const int64_t numel, int64_t* skipped) {
  add_skipped(flat_body(op, numel, blockIdx.x, threadIdx.x, gridDim.x, blockDim.x), skipped);
}

template <typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    list_kernel(const ListLaunch<Op> launch, int64_t* skipped) {
  add_skipped(list_body(launch, blockIdx.x, threadIdx.x, blockDim.x), skipped);
}

int multiprocessor_count() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

struct CudaExec {
  using DeviceGuard = c10::cuda::CUDAGuard;

  template <typename Op>
  void run(const Op& op, int64_t numel, int64_t* skipped) const {
    if (numel == 0) return;
    const int64_t vectors = (numel + Op::kVec - 1) / Op::kVec;
    const int64_t wanted = (vectors + kBlockThreads - 1) / kBlockThreads;
    const int64_t resident = static_cast<int64_t>(multiprocessor_count()) * kBlocksPerSm;
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, resident)));
    flat_kernel<Op><<<blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        op, numel, skipped);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename Op>
  void run_list(const std::vector<Op>& ops, const std::vector<int64_t>& numels,
                int64_t* skipped) const {
    static_assert(sizeof(ListLaunch<Op>) <= 4096, "a kernel argument must fit in 4 KiB");
    for (const auto& launch : plan_list_launches(ops, numels, kListChunk)) {
      list_kernel<Op><<<launch.blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          launch, skipped);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

}  // namespace
}  // namespace belay

TORCH_LIBRARY_IMPL(belay_kernels, CUDA, m) {
  BELAY_REGISTER_IMPLS(m, ::belay::CudaExec);
}
