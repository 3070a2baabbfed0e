// The paper's Section 3 baseline: split each group, in the given order, into n/k blocks of k and give
// every response k times the best reward of its block.
#include <algorithm>

#include "rspo_kernels.hpp"

namespace rspo {

template <typename T>
void hitchhiking_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, bool binary, T* out) {
    check_groups(offsets, num_groups, k, false, /*divisible=*/true);
    const int64_t total = offsets[num_groups];
    const int64_t blocks = total / k;  // every group is a whole number of blocks, so blocks tile values
#pragma omp parallel for schedule(static) if (total >= kParallelMinSamplesCheap)
    for (int64_t b = 0; b < blocks; ++b) {
        const T* v = values + b * k;
        // Pass@k: a block passes when any member is correct, and any non-zero reward is correct.
        const T best = binary ? T(std::any_of(v, v + k, [](T x) { return x != T(0); }))
                              : *std::max_element(v, v + k);
        // k * best in double is exact for float and correctly rounded for double.
        const T w = static_cast<T>(static_cast<double>(k) * static_cast<double>(best));
        std::fill(out + b * k, out + (b + 1) * k, w);
    }
}

template void hitchhiking_weights<float>(const float*, const int64_t*, int64_t, int64_t, bool, float*);
template void hitchhiking_weights<double>(const double*, const int64_t*, int64_t, int64_t, bool, double*);

}  // namespace rspo
