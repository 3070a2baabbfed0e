// Unbiased per-group evaluation metrics (docs/math.md, Evaluation metrics).
#include <cmath>
#include <limits>
#include <vector>

#include "binomial.hpp"
#include "group_sort.hpp"
#include "rspo_kernels.hpp"

namespace rspo {

// pass@k = 1 - C(n-c, k)/C(n, k), computed as -expm1(sum log1p(...)) over min(c, k) factors.
template <typename T>
void pass_at_k_metric(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, T* out) {
    check_groups(offsets, num_groups, k);
    const int64_t total = offsets[num_groups];
#pragma omp parallel if (total >= kParallelMinSamplesCheap && num_groups > 1)
    {
        std::vector<double> memo;  // by c, for the current group size
        int64_t memo_n = -1;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < num_groups; ++g) {
            const T* v = values + offsets[g];
            const int64_t n = offsets[g + 1] - offsets[g];
            int64_t c = 0;
            for (int64_t i = 0; i < n; ++i) c += (v[i] != T(0));
            if (n > kMemoMaxGroupSize) {
                out[g] = static_cast<T>(hit_probability(c, n, k));
                continue;
            }
            if (n != memo_n) {
                memo_n = n;
                memo.assign(n + 1, std::numeric_limits<double>::quiet_NaN());
            }
            if (std::isnan(memo[c])) memo[c] = hit_probability(c, n, k);
            out[g] = static_cast<T>(memo[c]);
        }
    }
}

// max@k = sum_p s[p] C(p, k-1)/C(n, k) over the ascending sort, and C(p, k-1)/C(n, k) = q(p) k/n.
template <typename T>
void max_at_k_metric(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, T* out) {
    check_groups(offsets, num_groups, k);
    const int64_t total = offsets[num_groups];
#pragma omp parallel if (total >= kParallelMinSamples && num_groups > 1)
    {
        GroupSorter<T> sorter;
        std::vector<double> q;
        int64_t q_n = -1;
#pragma omp for schedule(dynamic, 8)
        for (int64_t g = 0; g < num_groups; ++g) {
            const T* v = values + offsets[g];
            const int64_t n = offsets[g + 1] - offsets[g];
            if (n != q_n) {
                q_n = n;
                q.resize(n);
                tail_ratios(n - 1, k - 1, q.data());
                // Fold k/n into the coefficients before they meet the rewards: they then sum to 1,
                // so no partial sum exceeds max |R| (multiplying the sum by k/n last overflows
                // near the float64 maximum).
                const double scale = static_cast<double>(k) / static_cast<double>(n);
                for (double& x : q) x *= scale;
            }
            sorter.sort(v, n);
            const uint32_t* idx = sorter.index();
            double acc = 0.0;
            for (int64_t p = k - 1; p < n; ++p) acc += q[p] * static_cast<double>(v[idx[p]]);
            out[g] = static_cast<T>(acc);
        }
    }
}

template void pass_at_k_metric<float>(const float*, const int64_t*, int64_t, int64_t, float*);
template void pass_at_k_metric<double>(const double*, const int64_t*, int64_t, int64_t, double*);
template void max_at_k_metric<float>(const float*, const int64_t*, int64_t, int64_t, float*);
template void max_at_k_metric<double>(const double*, const int64_t*, int64_t, int64_t, double*);

}  // namespace rspo
