// Kernels of rspo_kernels' CPU backend: plain functions on raw buffers, templated on the float
// type (float or double; arithmetic is always done in double). No Python or torch types here.
//
// Layout (rspo_kernels._layout.Groups): G groups stored one after another in `values`; group g is
// values[offsets[g] .. offsets[g+1]). Per-sample outputs have the layout of `values`, per-group
// outputs have G entries. Invalid arguments raise std::invalid_argument before any work starts.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rspo {

enum class Objective { pass_at_k, max_at_k };
enum class Estimator { rspo, plugin, hitchhiking, pkpo, pkpo_loo, passk_training_std, ordergrad };

Objective parse_objective(const std::string& name);
Estimator parse_estimator(const std::string& name);

// Max@k weights of real rewards (sorted_weights.cpp): rspo, plugin, pkpo, pkpo_loo, ordergrad.
// passk_training_std is defined for binary rewards only and is rejected.
template <typename T>
void max_at_k_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, Estimator est, T* out);

// Pass@k weights of binary rewards from the per-group count of non-zero rewards
// (binary_weights.cpp). With `validate`, the same read also checks that every reward is exactly
// 0 or 1, and the index of the first one that is not is returned (-1 if none; the weights are
// then unspecified). Without it, any non-zero reward counts as correct and -1 is returned.
template <typename T>
int64_t pass_at_k_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, Estimator est,
                          bool validate, T* out);

// k times the maximum of each consecutive block of k (hitchhiking.cpp); with `binary` (Pass@k),
// k if any reward of the block is non-zero, else 0.
template <typename T>
void hitchhiking_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, bool binary, T* out);

// Unbiased per-group metrics (metrics.cpp); `out` has num_groups entries.
template <typename T>
void pass_at_k_metric(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, T* out);
template <typename T>
void max_at_k_metric(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, T* out);

// Index of the first value that is not finite (binary = false) or not exactly 0 or 1
// (binary = true), or -1 if every value passes (validation.cpp).
template <typename T>
int64_t first_invalid(const T* values, int64_t n, bool binary);

// Any objective and estimator. With `validate`, returns the index of the first reward that is not
// finite (Max@k) or not exactly 0 or 1 (Pass@k), or -1; Pass@k checks inside its counting read,
// the others scan first. Without it, returns -1.
template <typename T>
int64_t grouped_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, Objective obj,
                        Estimator est, bool validate, T* out) {
    const bool binary = obj == Objective::pass_at_k;
    if (binary && est != Estimator::hitchhiking)
        return pass_at_k_weights(values, offsets, num_groups, k, est, validate, out);
    if (validate) {
        const int64_t bad = first_invalid(values, offsets[num_groups], binary);
        if (bad >= 0) return bad;
    }
    if (est == Estimator::hitchhiking) {
        hitchhiking_weights(values, offsets, num_groups, k, binary, out);
    } else {
        max_at_k_weights(values, offsets, num_groups, k, est, out);
    }
    return -1;
}

// Checks the offsets and that every group admits k: k <= n, plus k < n (`strict`: pkpo_loo, ordergrad)
// or n % k == 0 (`divisible`) where an estimator needs it. Returns the common group size, or -1 if ragged.
int64_t check_groups(const int64_t* offsets, int64_t num_groups, int64_t k, bool strict = false,
                     bool divisible = false);

// Below this many samples a call runs on one thread: waking threads would cost more than it saves.
// Sorting kernels do ~10 ns of work per sample; counting kernels (Pass@k, hitchhiking) well under
// 1 ns, so they need more (torch uses the same grain size, 32768, for its elementwise ops).
constexpr int64_t kParallelMinSamples = 16384;
constexpr int64_t kParallelMinSamplesCheap = 32768;

// Per-count memo tables (Pass@k) are used for groups up to this size; larger groups are few, and
// computing their two weights directly is cheaper than filling an (n + 1)-entry table.
constexpr int64_t kMemoMaxGroupSize = 4096;

}  // namespace rspo
