// Ratios of binomial coefficients, never forming C(n, k) itself (docs/math.md, Numerics).
#pragma once

#include <cmath>
#include <cstdint>

namespace rspo {

// out[j] = C(j, r) / C(top, r) for j = 0..top.
// Downward recurrence from out[top] = 1 using C(j-1, r) / C(j, r) = (j - r) / j: the values only
// shrink, so nothing overflows, and the relative error after m steps is at most m ulps.
inline void tail_ratios(int64_t top, int64_t r, double* out) {
    out[top] = 1.0;
    for (int64_t j = top; j > r; --j) out[j - 1] = out[j] * static_cast<double>(j - r) / static_cast<double>(j);
    for (int64_t j = 0; j < r && j <= top; ++j) out[j] = 0.0;
}

// C(total - ones, r) / C(total, r): the chance that r draws without replacement from `total`
// items, `ones` of them marked, miss every marked one. A product of min(ones, r) factors.
inline double miss_ratio(int64_t ones, int64_t total, int64_t r) {
    if (total - ones < r) return 0.0;
    double p = 1.0;
    if (ones <= r) {
        // C(t-o, r)/C(t, r) = prod_{j=t-o+1..t} (j - r)/j
        for (int64_t j = total - ones + 1; j <= total; ++j) p *= static_cast<double>(j - r) / static_cast<double>(j);
    } else {
        for (int64_t j = 0; j < r; ++j) p *= static_cast<double>(total - ones - j) / static_cast<double>(total - j);
    }
    return p;
}

// 1 - miss_ratio(ones, total, r), as -expm1(sum log1p(-x)) so that a probability close to 0 keeps
// its relative accuracy (1 - product would cancel).
inline double hit_probability(int64_t ones, int64_t total, int64_t r) {
    if (total - ones < r) return 1.0;
    double s = 0.0;
    if (ones <= r) {
        for (int64_t j = total - ones + 1; j <= total; ++j) s += std::log1p(-static_cast<double>(r) / static_cast<double>(j));
    } else {
        for (int64_t j = 0; j < r; ++j) s += std::log1p(-static_cast<double>(ones) / static_cast<double>(total - j));
    }
    return -std::expm1(s);
}

}  // namespace rspo
