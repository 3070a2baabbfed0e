// Sorting one group: a stable sort of (value, original index) pairs, so results are bitwise
// reproducible. Insertion sort for small groups, LSD radix sort on order-preserving integer keys
// for large ones (O(n) per digit, no comparisons).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace rspo {

template <typename T>
struct KeyType;
template <>
struct KeyType<float> {
    using type = uint32_t;
};
template <>
struct KeyType<double> {
    using type = uint64_t;
};

// Maps IEEE floats to unsigned integers with the same order (finite inputs; -0 sorts before +0,
// which is harmless: callers detect ties by comparing values, not keys).
template <typename T>
inline typename KeyType<T>::type order_key(T x) {
    using U = typename KeyType<T>::type;
    U u;
    std::memcpy(&u, &x, sizeof(U));
    const U sign = U(1) << (8 * sizeof(U) - 1);
    return (u & sign) ? static_cast<U>(~u) : static_cast<U>(u | sign);
}

template <typename T>
class GroupSorter {
  public:
    using U = typename KeyType<T>::type;
    static constexpr int64_t kInsertionMax = 48;

    // After sort(v, n), index()[p] is the original position of the p-th smallest value.
    void sort(const T* v, int64_t n) {
        if (static_cast<int64_t>(key_.size()) < n) {
            key_.resize(n);
            idx_.resize(n);
        }
        for (int64_t i = 0; i < n; ++i) {
            key_[i] = order_key(v[i]);
            idx_[i] = static_cast<uint32_t>(i);
        }
        if (n <= kInsertionMax) {
            insertion_sort(n);
        } else {
            radix_sort(n);
        }
    }
    const uint32_t* index() const { return idx_.data(); }

  private:
    void insertion_sort(int64_t n) {
        U* key = key_.data();
        uint32_t* idx = idx_.data();
        for (int64_t i = 1; i < n; ++i) {
            const U kk = key[i];
            const uint32_t ii = idx[i];
            int64_t j = i;
            for (; j > 0 && key[j - 1] > kk; --j) {  // strict: equal keys keep their order
                key[j] = key[j - 1];
                idx[j] = idx[j - 1];
            }
            key[j] = kk;
            idx[j] = ii;
        }
    }

    void radix_sort(int64_t n) {
        constexpr int kDigits = sizeof(U);
        if (static_cast<int64_t>(key_tmp_.size()) < n) {
            key_tmp_.resize(n);
            idx_tmp_.resize(n);
        }
        // One pass builds the histograms of every byte.
        std::vector<int64_t>& count = count_;
        count.assign(static_cast<size_t>(kDigits) * 256, 0);
        for (int64_t i = 0; i < n; ++i) {
            const U kk = key_[i];
            for (int d = 0; d < kDigits; ++d) ++count[d * 256 + ((kk >> (8 * d)) & 0xFF)];
        }
        U* src_k = key_.data();
        U* dst_k = key_tmp_.data();
        uint32_t* src_i = idx_.data();
        uint32_t* dst_i = idx_tmp_.data();
        for (int d = 0; d < kDigits; ++d) {
            int64_t* c = &count[d * 256];
            if (c[(src_k[0] >> (8 * d)) & 0xFF] == n) continue;  // every key shares this byte
            int64_t sum = 0;
            for (int b = 0; b < 256; ++b) {
                const int64_t t = c[b];
                c[b] = sum;
                sum += t;
            }
            for (int64_t i = 0; i < n; ++i) {
                const int64_t pos = c[(src_k[i] >> (8 * d)) & 0xFF]++;
                dst_k[pos] = src_k[i];
                dst_i[pos] = src_i[i];
            }
            std::swap(src_k, dst_k);
            std::swap(src_i, dst_i);
        }
        if (src_k != key_.data()) {
            std::memcpy(key_.data(), src_k, sizeof(U) * n);
            std::memcpy(idx_.data(), src_i, sizeof(uint32_t) * n);
        }
    }

    std::vector<U> key_, key_tmp_;
    std::vector<uint32_t> idx_, idx_tmp_;
    std::vector<int64_t> count_;
};

}  // namespace rspo
