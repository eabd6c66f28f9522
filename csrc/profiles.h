// The most EMA profiles one multi_ema_update_ call takes: each count is a compiled
// kernel, and belay_kernels._C reports it as MAX_PROFILES (belay_kernels/backend/_compiled.py).
#pragma once

namespace belay {
constexpr int kMaxProfiles = 8;
}  // namespace belay
