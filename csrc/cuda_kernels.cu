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
#include <atomic>
#include <vector>

#include "grid_body.h"
#include "op_entries.h"

namespace belay {
namespace {

constexpr int kBlockThreads = 256;
// At least this many blocks per SM, which caps registers at 80 per thread: left to itself
// ptxas aimed at 64 and spilled BelayOp<float, float> with 4 vectors in flight. 768
// threads with 64 bytes of each tensor in flight hold more than DRAM latency times
// bandwidth asks of an SM (about 20 KB on an H100: 3.35 TB/s x ~0.8 us / 132 SMs).
constexpr int kMinBlocksPerSm = 3;
// The fp64 K-profile EMA holds K fp64 rates and K addresses besides its data, and spilled
// under 80 registers; at 2 blocks per SM (512 threads) it still has 32 KB in flight.
//
// An op may set its own (kMinBlocksPerSm): the fused optimizer steps hold up to five
// tensors' vectors, the step's scalars and the shadows' addresses, and spilled under 80
// registers (and some under 128).
template <typename Op>
constexpr int min_blocks_per_sm() {
  if constexpr (requires { Op::kMinBlocksPerSm; }) return Op::kMinBlocksPerSm;
  if constexpr (has_profiles<Op>) {
    if constexpr (sizeof(typename Op::T) == 8) return 2;
  }
  return kMinBlocksPerSm;
}
constexpr int64_t kListChunk = 1 << 16;  // elements per chunk in a tensor-list launch
constexpr int kMaxDevices = 64;          // per-device caches; more devices are not cached

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
__global__ void __launch_bounds__(kBlockThreads, min_blocks_per_sm<Op>())
    flat_kernel(const Op op, const int64_t numel, int64_t* skipped) {
  add_skipped(flat_body(op, numel, blockIdx.x, threadIdx.x, gridDim.x, blockDim.x), skipped);
}

template <typename Op>
__global__ void __launch_bounds__(kBlockThreads, min_blocks_per_sm<Op>())
    list_kernel(const ListLaunch<Op> launch, int64_t* skipped) {
  add_skipped(list_body(launch, blockIdx.x, threadIdx.x, blockDim.x), skipped);
}

// A per-device value computed once (a race only computes it twice).
template <typename Compute>
int cached_per_device(std::atomic<int> (&cache)[kMaxDevices], int device, Compute compute) {
  if (device < 0 || device >= kMaxDevices) return compute();
  int value = cache[device].load(std::memory_order_relaxed);
  if (value == 0) {
    value = compute();
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

int multiprocessor_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  return cached_per_device(cache, device, [device] {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  });
}

// Blocks of ``kernel`` the GPU holds at once, from its register and shared memory use on
// this device (the launch sizing the occupancy calculator gives), at least one per SM.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int device) {
  static std::atomic<int> cache[kMaxDevices];
  const int per_sm = cached_per_device(cache, device, [kernel] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel,
                                                                  kBlockThreads, 0));
    return std::max(blocks, 1);
  });
  return static_cast<int64_t>(per_sm) * multiprocessor_count(device);
}

struct CudaExec {
  using DeviceGuard = c10::cuda::CUDAGuard;

  template <typename Op>
  void run(const Op& op, int64_t numel, int64_t* skipped) const {
    if (numel == 0) return;
    // One wave of as many blocks as fit at once, each thread striding over the span with
    // vectors_in_flight vectors at a time; fewer blocks where there is less work.
    const int64_t per_block = int64_t{kBlockThreads} * Op::kVec * vectors_in_flight<Op>();
    const int64_t wanted = (numel + per_block - 1) / per_block;
    const int64_t resident = resident_blocks(flat_kernel<Op>, current_device());
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, resident)));
    flat_kernel<Op><<<blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        op, numel, skipped);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename Op>
  void run_list(const std::vector<Op>& ops, const std::vector<int64_t>& numels,
                int64_t* skipped) const {
    static_assert(sizeof(ListLaunch<Op>) <= kListArgumentBytes, "a kernel argument must fit in 4 KiB");
    const int64_t resident = resident_blocks(list_kernel<Op>, current_device());
    for (const auto& launch : plan_list_launches(ops, numels, kListChunk, resident, kBlockThreads)) {
      const unsigned blocks = static_cast<unsigned>(launch.blocks) * launch.split;
      list_kernel<Op><<<blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          launch, skipped);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

}  // namespace

// For belay_kernels.backends() (cuda_module.cpp): the virtual archs of this build, and
// whether ``device`` can load its kernels (the runtime's answer: "" or its error).
const char* built_arches() {
#if defined(__CUDA_ARCH_LIST__)
#define BK_STRINGIFY(...) #__VA_ARGS__
#define BK_AS_STRING(...) BK_STRINGIFY(__VA_ARGS__)
  return BK_AS_STRING(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

const char* kernel_image_error(int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t error = cudaFuncGetAttributes(&attributes, flat_kernel<ExchangeOp<uint32_t>>);
  if (error == cudaSuccess) return "";
  (void)cudaGetLastError();  // clear it, so the next launch does not report it
  return cudaGetErrorString(error);
}

}  // namespace belay

TORCH_LIBRARY_IMPL(belay_kernels, CUDA, m) {
  using belay::CudaExec;
  m.impl("ema_update_", &belay::ema_update<CudaExec>);
  m.impl("ema_update_foreach_", &belay::ema_update_foreach<CudaExec>);
  m.impl("multi_ema_update_", &belay::multi_ema_update<CudaExec>);
  m.impl("multi_ema_update_foreach_", &belay::multi_ema_update_foreach<CudaExec>);
  m.impl("swa_update_", &belay::swa_update<CudaExec>);
  m.impl("swa_update_foreach_", &belay::swa_update_foreach<CudaExec>);
  m.impl("belay_step_", &belay::belay_step<CudaExec>);
  m.impl("belay_step_foreach_", &belay::belay_step_foreach<CudaExec>);
  m.impl("two_point_average_", &belay::two_point_average<CudaExec>);
  m.impl("two_point_average_foreach_", &belay::two_point_average_foreach<CudaExec>);
  m.impl("swap_", &belay::swap<CudaExec>);
  m.impl("swap_foreach_", &belay::swap_foreach<CudaExec>);
  m.impl("adam_average_", &belay::adam_average<CudaExec>);
  m.impl("sgd_average_", &belay::sgd_average<CudaExec>);
}
