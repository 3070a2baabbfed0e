// One pass over the rewards for the public API's value checks (finite; binary for Pass@k).
#include <cmath>
#include <limits>

#include "rspo_kernels.hpp"

namespace rspo {
namespace {

template <typename T, bool Binary>
inline bool invalid(T v) {
    if (Binary) return (v != T(0)) & (v != T(1));          // also catches NaN and inf
    return !(std::fabs(v) <= std::numeric_limits<T>::max());  // NaN and inf fail the comparison
}

template <typename T, bool Binary>
int64_t scan(const T* values, int64_t n) {
    // Blocks with a branch-free inner loop, so the common all-valid case vectorises.
    constexpr int64_t kBlock = 2048;
    for (int64_t start = 0; start < n; start += kBlock) {
        const int64_t end = start + kBlock < n ? start + kBlock : n;
        int bad = 0;
        for (int64_t i = start; i < end; ++i) bad |= invalid<T, Binary>(values[i]);
        if (bad) {
            for (int64_t i = start; i < end; ++i)
                if (invalid<T, Binary>(values[i])) return i;
        }
    }
    return -1;
}

}  // namespace

template <typename T>
int64_t first_invalid(const T* values, int64_t n, bool binary) {
    return binary ? scan<T, true>(values, n) : scan<T, false>(values, n);
}

template int64_t first_invalid<float>(const float*, int64_t, bool);
template int64_t first_invalid<double>(const double*, int64_t, bool);

}  // namespace rspo
