// Pass@k weights of binary rewards. A group's weights depend only on n, on the count c of correct
// responses and on the sample's own reward, so there is no sort: count, look up two numbers, write.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "binomial.hpp"
#include "rspo_kernels.hpp"

namespace rspo {
namespace {

struct PairOfWeights {
    double correct, wrong;
};

// The weights of a correct and of a wrong response in a group of n with c correct.
// Each is E over the (k-1)-subsets S of the n-1 others, so they are hypergeometric tail ratios.
PairOfWeights binary_pair(int64_t n, int64_t c, int64_t k, Estimator est) {
    const double dk = static_cast<double>(k);
    switch (est) {
        case Estimator::rspo:
            // k * P(S has no correct response | the other n-1 hold c-1 correct) = k C(n-c, k-1)/C(n-1, k-1)
            return {c > 0 ? dk * miss_ratio(c - 1, n - 1, k - 1) : 0.0, 0.0};
        case Estimator::plugin:  // eq. 7: k (1 - c/n)^(k-1) R_i
            return {dk * std::pow(1.0 - static_cast<double>(c) / static_cast<double>(n), static_cast<double>(k - 1)),
                    0.0};
        case Estimator::pkpo:  // k E[max(R_i, max S)]: k if correct, else k P(S has a correct one)
            return {dk, dk * hit_probability(c, n - 1, k - 1)};
        case Estimator::pkpo_loo: {
            // minus n/(n-1) * k * pass@k of the n-1 others (needs k < n)
            const double scale = static_cast<double>(n) / static_cast<double>(n - 1) * dk;
            const double correct = c > 0 ? dk - scale * hit_probability(c - 1, n - 1, k) : 0.0;
            return {correct, dk * hit_probability(c, n - 1, k - 1) - scale * hit_probability(c, n - 1, k)};
        }
        case Estimator::passk_training_std: {
            // Chen et al. (arXiv 2508.10751): (value - rho) / (sigma + 1e-6), where the values are
            // 1 (correct) and 1 - C(n-c-1, k-1)/C(n-1, k-1) (wrong), rho = pass@k and
            // sigma = sqrt(rho (1 - rho)). Since C(n-c, k)/C(n, k) = (n-c)/n * C(n-c-1, k-1)/C(n-1, k-1),
            // the centred values are 1 - rho = miss and -c/(n-c) * miss: no cancellation.
            const double miss = miss_ratio(c, n, k);
            const double denom = std::sqrt(hit_probability(c, n, k) * miss) + 1e-6;
            const double wrong = c < n ? 0.0 - static_cast<double>(c) / static_cast<double>(n - c) * miss / denom : 0.0;
            return {miss / denom, wrong};
        }
        case Estimator::ordergrad: {
            // OrderGrad / MaxPO, k (q_i - M_i) (needs k < n): a correct response gets k times the chance
            // that k of the others all fail, k C(n-c, k)/C(n-1, k); a wrong one
            // -k c/(n-k) C(n-1-c, k-1)/C(n-1, k-1) (docs/math.md).
            const double correct = c > 0 ? dk * miss_ratio(c - 1, n - 1, k) : 0.0;
            const double wrong = c > 0 && c < n ? 0.0 - dk * static_cast<double>(c) / static_cast<double>(n - k) *
                                                           miss_ratio(c, n - 1, k - 1)
                                                : 0.0;
            return {correct, wrong};
        }
        case Estimator::hitchhiking:  // rejected before the parallel region (no throwing inside it)
            break;
    }
    return {0.0, 0.0};
}

// Per-thread memo of binary_pair by c for the current group size (dense batches reuse it).
class PairCache {
  public:
    PairCache(int64_t k, Estimator est) : k_(k), est_(est) {}
    PairOfWeights get(int64_t n, int64_t c) {
        if (n > kMemoMaxGroupSize) return binary_pair(n, c, k_, est_);
        if (n != n_) {
            n_ = n;
            table_.assign(n + 1, {std::numeric_limits<double>::quiet_NaN(), 0.0});
        }
        PairOfWeights& entry = table_[c];
        if (std::isnan(entry.correct)) entry = binary_pair(n, c, k_, est_);
        return entry;
    }

  private:
    int64_t k_;
    Estimator est_;
    int64_t n_ = -1;
    std::vector<PairOfWeights> table_;
};

// The two streaming loops below are the whole cost of Pass@k for large groups. On x86-64 Linux
// with GCC they are also compiled for AVX2 and picked at load time (the baseline ISA is SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RSPO_STREAMING __attribute__((target_clones("avx2", "default")))
#else
#define RSPO_STREAMING
#endif

// Number of non-zero rewards; 32-bit partial counts vectorise better than a 64-bit accumulator.
// With Check, the same read counts the ones and the zeros instead: every reward is binary exactly
// when they add up to n (NaN equals neither), and the ones are then the correct responses. Two
// vector compares per element, and validation costs no second pass over memory.
template <bool Check, typename T>
inline int64_t count_nonzero_impl(const T* v, int64_t n, bool* bad) {
    constexpr int64_t kChunk = int64_t(1) << 30;
    int64_t c = 0;
    for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t end = start + kChunk < n ? start + kChunk : n;
        int32_t part = 0, zeros = 0;
        for (int64_t i = start; i < end; ++i) {
            if (Check) {
                part += v[i] == T(1);
                zeros += v[i] == T(0);
            } else {
                part += v[i] != T(0);
            }
        }
        if (Check && part + zeros != end - start) *bad = true;
        c += part;
    }
    return c;
}
RSPO_STREAMING int64_t count_nonzero(const float* v, int64_t n) { return count_nonzero_impl<false>(v, n, nullptr); }
RSPO_STREAMING int64_t count_nonzero(const double* v, int64_t n) { return count_nonzero_impl<false>(v, n, nullptr); }
RSPO_STREAMING int64_t count_checked(const float* v, int64_t n, bool* bad) { return count_nonzero_impl<true>(v, n, bad); }
RSPO_STREAMING int64_t count_checked(const double* v, int64_t n, bool* bad) { return count_nonzero_impl<true>(v, n, bad); }

template <typename T>
inline int64_t count(const T* v, int64_t n, bool validate, bool* bad) {
    return validate ? count_checked(v, n, bad) : count_nonzero(v, n);
}

template <typename T>
inline void write_weights_impl(const T* __restrict v, int64_t n, T correct, T wrong, T* __restrict o) {
    for (int64_t i = 0; i < n; ++i) o[i] = v[i] != T(0) ? correct : wrong;
}
RSPO_STREAMING void write_weights(const float* v, int64_t n, float correct, float wrong, float* o) {
    write_weights_impl(v, n, correct, wrong, o);
}
RSPO_STREAMING void write_weights(const double* v, int64_t n, double correct, double wrong, double* o) {
    write_weights_impl(v, n, correct, wrong, o);
}

// Groups [g0, g1): count (and check), look the two weights up, write. Returns the first group
// with a non-binary reward (checked only with `validate`), or g1.
template <typename T>
inline int64_t weigh_groups_impl(const T* values, const int64_t* offsets, int64_t g0, int64_t g1, PairCache& cache,
                                 bool validate, T* out) {
    int64_t first_bad = g1;
    for (int64_t g = g0; g < g1; ++g) {
        const T* v = values + offsets[g];
        const int64_t n = offsets[g + 1] - offsets[g];
        bool bad = false;
        const int64_t c = validate ? count_nonzero_impl<true>(v, n, &bad) : count_nonzero_impl<false>(v, n, nullptr);
        if (bad && g < first_bad) first_bad = g;
        const PairOfWeights pw = cache.get(n, c);
        write_weights_impl(v, n, static_cast<T>(pw.correct), static_cast<T>(pw.wrong), out + offsets[g]);
    }
    return first_bad;
}
RSPO_STREAMING int64_t weigh_groups(const float* values, const int64_t* offsets, int64_t g0, int64_t g1,
                                    PairCache& cache, bool validate, float* out) {
    return weigh_groups_impl(values, offsets, g0, g1, cache, validate, out);
}
RSPO_STREAMING int64_t weigh_groups(const double* values, const int64_t* offsets, int64_t g0, int64_t g1,
                                    PairCache& cache, bool validate, double* out) {
    return weigh_groups_impl(values, offsets, g0, g1, cache, validate, out);
}

}  // namespace

template <typename T>
int64_t pass_at_k_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, Estimator est,
                          bool validate, T* out) {
    if (est == Estimator::hitchhiking) throw std::invalid_argument("use hitchhiking_weights");
    check_groups(offsets, num_groups, k, est == Estimator::pkpo_loo || est == Estimator::ordergrad);
    const int64_t total = offsets[num_groups];
    int64_t first_bad_group = num_groups;  // groups are stored in order: the first bad group holds the first bad value
    if (num_groups < 4 && total >= kParallelMinSamplesCheap) {
        // A few huge groups: parallelise inside each group instead of across groups.
        PairCache cache(k, est);
        for (int64_t g = 0; g < num_groups; ++g) {
            const T* v = values + offsets[g];
            const int64_t n = offsets[g + 1] - offsets[g];
            constexpr int64_t kBlock = 1 << 16;
            const int64_t blocks = (n + kBlock - 1) / kBlock;
            int64_t c = 0;
            int bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : c) reduction(| : bad)
            for (int64_t b = 0; b < blocks; ++b) {
                bool block_bad = false;
                c += count(v + b * kBlock, std::min(kBlock, n - b * kBlock), validate, &block_bad);
                bad |= block_bad;
            }
            if (bad) {
                first_bad_group = g;
                break;
            }
            const PairOfWeights pw = cache.get(n, c);
            const T correct = static_cast<T>(pw.correct), wrong = static_cast<T>(pw.wrong);
            T* o = out + offsets[g];
#pragma omp parallel for schedule(static)
            for (int64_t b = 0; b < blocks; ++b)
                write_weights(v + b * kBlock, std::min(kBlock, n - b * kBlock), correct, wrong, o + b * kBlock);
        }
    } else {
#pragma omp parallel if (total >= kParallelMinSamplesCheap && num_groups > 1)
        {
            PairCache cache(k, est);
            // One contiguous range of groups per thread, in one call: small groups would otherwise
            // pay the dispatch of the streaming loops per group.
#ifdef _OPENMP
            const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
#else
            const int64_t threads = 1, t = 0;
#endif
            const int64_t g0 = num_groups * t / threads, g1 = num_groups * (t + 1) / threads;
            const int64_t my_first_bad = weigh_groups(values, offsets, g0, g1, cache, validate, out);
            if (my_first_bad < g1) {
#pragma omp critical(rspo_first_bad)
                first_bad_group = std::min(first_bad_group, my_first_bad);
            }
        }
    }
    if (first_bad_group == num_groups) return -1;
    const int64_t start = offsets[first_bad_group];
    return start + first_invalid(values + start, offsets[first_bad_group + 1] - start, true);
}

template int64_t pass_at_k_weights<float>(const float*, const int64_t*, int64_t, int64_t, Estimator, bool, float*);
template int64_t pass_at_k_weights<double>(const double*, const int64_t*, int64_t, int64_t, Estimator, bool, double*);

}  // namespace rspo
