// Pass@k weights of binary rewards. A group's weights depend only on n, on the count c of correct
// responses and on the sample's own reward, so there is no sort: count, look up two numbers, write.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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
template <typename T>
inline int64_t count_nonzero_impl(const T* v, int64_t n) {
    constexpr int64_t kChunk = int64_t(1) << 30;
    int64_t c = 0;
    for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t end = start + kChunk < n ? start + kChunk : n;
        int32_t part = 0;
        for (int64_t i = start; i < end; ++i) part += (v[i] != T(0));
        c += part;
    }
    return c;
}
RSPO_STREAMING int64_t count_nonzero(const float* v, int64_t n) { return count_nonzero_impl(v, n); }
RSPO_STREAMING int64_t count_nonzero(const double* v, int64_t n) { return count_nonzero_impl(v, n); }

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

}  // namespace

template <typename T>
void pass_at_k_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, Estimator est, T* out) {
    if (est == Estimator::hitchhiking) throw std::invalid_argument("use hitchhiking_weights");
    check_groups(offsets, num_groups, k, est == Estimator::pkpo_loo);
    const int64_t total = offsets[num_groups];
    if (num_groups < 4 && total >= kParallelMinSamplesCheap) {
        // A few huge groups: parallelise inside each group instead of across groups.
        PairCache cache(k, est);
        for (int64_t g = 0; g < num_groups; ++g) {
            const T* v = values + offsets[g];
            const int64_t n = offsets[g + 1] - offsets[g];
            constexpr int64_t kBlock = 1 << 16;
            const int64_t blocks = (n + kBlock - 1) / kBlock;
            int64_t c = 0;
#pragma omp parallel for schedule(static) reduction(+ : c)
            for (int64_t b = 0; b < blocks; ++b) c += count_nonzero(v + b * kBlock, std::min(kBlock, n - b * kBlock));
            const PairOfWeights pw = cache.get(n, c);
            const T correct = static_cast<T>(pw.correct), wrong = static_cast<T>(pw.wrong);
            T* o = out + offsets[g];
#pragma omp parallel for schedule(static)
            for (int64_t b = 0; b < blocks; ++b)
                write_weights(v + b * kBlock, std::min(kBlock, n - b * kBlock), correct, wrong, o + b * kBlock);
        }
        return;
    }
#pragma omp parallel if (total >= kParallelMinSamplesCheap && num_groups > 1)
    {
        PairCache cache(k, est);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < num_groups; ++g) {
            const T* v = values + offsets[g];
            const int64_t n = offsets[g + 1] - offsets[g];
            const PairOfWeights pw = cache.get(n, count_nonzero(v, n));
            const T correct = static_cast<T>(pw.correct), wrong = static_cast<T>(pw.wrong);
            write_weights(v, n, correct, wrong, out + offsets[g]);
        }
    }
}

template void pass_at_k_weights<float>(const float*, const int64_t*, int64_t, int64_t, Estimator, float*);
template void pass_at_k_weights<double>(const double*, const int64_t*, int64_t, int64_t, Estimator, double*);

}  // namespace rspo
