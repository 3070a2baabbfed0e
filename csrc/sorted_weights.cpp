// Max@k weights of real-valued rewards: one sort per group, then prefix sums along the sort.
//
// Notation: s[0] <= ... <= s[n-1] is the sorted group, q(j) = C(j, k-1) / C(n-1, k-1).
// Every quantity below depends on a sample only through the start b of its tie block, so tied
// samples get bitwise-identical weights.
#include <algorithm>
#include <cmath>
#include <vector>

#include "binomial.hpp"
#include "group_sort.hpp"
#include "rspo_kernels.hpp"

namespace rspo {
namespace {

// Per-thread buffers and the binomial tables of the current group size.
template <typename T>
struct Workspace {
    GroupSorter<T> sorter;
    std::vector<double> s, w, hi1, hik;
    std::vector<double> q;   // q[j] = C(j, k-1) / C(n-1, k-1),             j = 0..n-1
    std::vector<double> a1;  // a1[j] = C(j, k-2) / C(n-1, k-1): max@(k-1) of n-1 others, j = 0..n-2
    std::vector<double> ak;  // ak[j] = C(j, k-1) / C(n-1, k):   max@k of n-1 others,     j = 0..n-2
    std::vector<double> up;  // up[j] = C(j, k) / C(n-1, k) (ordergrad),                 j = 0..n-1
    int64_t table_n = -1;

    void prepare(int64_t n, int64_t k, Estimator est) {
        if (static_cast<int64_t>(s.size()) < n) {
            s.resize(n);
            w.resize(n);
        }
        if ((est == Estimator::pkpo || est == Estimator::pkpo_loo) && static_cast<int64_t>(hi1.size()) < n) {
            hi1.resize(n);
            hik.resize(n);
        }
        if (table_n == n) return;
        table_n = n;
        q.resize(n);
        tail_ratios(n - 1, k - 1, q.data());
        if (est == Estimator::ordergrad) {
            up.resize(n);
            tail_ratios(n - 1, k, up.data());  // k < n (checked), so C(n-1, k) > 0
        }
        if (est == Estimator::pkpo || est == Estimator::pkpo_loo) {
            // Unbiased max@m of the n-1 others puts C(j, m-1)/C(n-1, m) on their j-th smallest;
            // C(j, m-1)/C(n-1, m) = [C(j, m-1)/C(n-2, m-1)] * m/(n-1).
            a1.assign(n > 1 ? n - 1 : 1, 0.0);
            ak.assign(n > 1 ? n - 1 : 1, 0.0);
            if (n > 1 && k >= 2) {
                tail_ratios(n - 2, k - 2, a1.data());
                for (double& x : a1) x *= static_cast<double>(k - 1) / static_cast<double>(n - 1);
            }
            if (est == Estimator::pkpo_loo && n > k) {
                tail_ratios(n - 2, k - 1, ak.data());
                for (double& x : ak) x *= static_cast<double>(k) / static_cast<double>(n - 1);
            }
        }
    }
};

// RSPO (Theorem C.4) after summation by parts:
//   w = k * sum_{j=1..b} q(j) * (s[j] - s[j-1]),
// every term non-negative, and constant across a tie block because s[j] - s[j-1] = 0 inside it.
inline void rspo_sorted(const double* s, const double* q, int64_t n, int64_t k, double* w) {
    double acc = 0.0;
    w[0] = 0.0;
    for (int64_t p = 1; p < n; ++p) {
        acc += q[p] * (s[p] - s[p - 1]);
        w[p] = static_cast<double>(k) * acc;
    }
}

// Plugin (eq. 11): w = k [R P^(k-1) - (k-1) g], P = #{R_j <= R}/n, g = (1/n) sum_{R_j < R} R_j P_j^(k-2).
inline void plugin_sorted(const double* s, int64_t n, int64_t k, double* w) {
    const double dn = static_cast<double>(n);
    double g_sum = 0.0;  // sum over earlier tie blocks of R_j P_j^(k-2)
    for (int64_t b = 0; b < n;) {
        int64_t e = b + 1;
        while (e < n && s[e] == s[b]) ++e;
        const double P = static_cast<double>(e) / dn;
        const double pw = std::pow(P, static_cast<double>(k - 2));
        const double wb = static_cast<double>(k) * (s[b] * pw * P - static_cast<double>(k - 1) * g_sum / dn);
        for (int64_t p = b; p < e; ++p) w[p] = wb;
        g_sum += static_cast<double>(e - b) * s[b] * pw;
        b = e;
    }
}

// hi[p] = sum_{j > p} s[j] c[j-1]: the upper part of a leave-one-out max@m whose coefficients are c.
inline void suffix_loo(const double* s, const double* c, int64_t n, double* hi) {
    hi[n - 1] = 0.0;
    for (int64_t p = n - 2; p >= 0; --p) hi[p] = hi[p + 1] + s[p + 1] * c[p];
}

// pkpo: w = k E[max(R_i, max S)] = rspo_i + k * max@(k-1) of the others, since
// max(R, M) = M + max(R - M, 0). pkpo_loo subtracts n/(n-1) * k * max@k of the others (Eq. 29).
// With the sample at sorted position b removed, the j-th smallest other is s[j] for j < b and
// s[j+1] for j >= b, so each leave-one-out metric is a prefix sum plus a suffix sum.
template <typename T>
void pkpo_sorted(Workspace<T>& ws, int64_t n, int64_t k, bool loo, double* w) {
    const double* s = ws.s.data();
    if (k >= 2) {
        rspo_sorted(s, ws.q.data(), n, k, w);
    } else {
        std::copy(s, s + n, w);  // k = 1: E[max(R_i, max of nothing)] = R_i
    }
    const double dk = static_cast<double>(k);
    const double loo_scale = loo ? static_cast<double>(n) / static_cast<double>(n - 1) * dk : 0.0;
    if (k >= 2) suffix_loo(s, ws.a1.data(), n, ws.hi1.data());
    if (loo) suffix_loo(s, ws.ak.data(), n, ws.hik.data());
    double lo1 = 0.0, lok = 0.0;
    for (int64_t b = 0; b < n;) {
        int64_t e = b + 1;
        while (e < n && s[e] == s[b]) ++e;
        const double add1 = k >= 2 ? dk * (lo1 + ws.hi1[b]) : 0.0;
        const double subk = loo ? loo_scale * (lok + ws.hik[b]) : 0.0;
        for (int64_t p = b; p < e; ++p) {
            w[p] = w[p] + add1 - subk;
            if (p < n - 1) {
                if (k >= 2) lo1 += s[p] * ws.a1[p];
                if (loo) lok += s[p] * ws.ak[p];
            }
        }
        b = e;
    }
}

// OrderGrad / MaxPO, k (q_i - M_i), in gap form (docs/math.md; estimators._max_ordergrad):
//   w[p] = k [ sum_{j=1..p} up[j] gap_j  -  sum_{j=p+1..n-1} q[j-1] (n-j)/(n-k) gap_j ],
// with gap_j = s[j] - s[j-1]: both sums have non-negative terms and gaps vanish inside a tie run,
// so tied samples get bitwise-identical weights and the weights are shift-invariant.
inline void ordergrad_sorted(const double* s, const double* q, const double* up, int64_t n, int64_t k, double* w) {
    const double nk = static_cast<double>(n - k);
    double down = 0.0;  // w[p] first holds minus the suffix sum over j > p ...
    w[n - 1] = 0.0;
    for (int64_t p = n - 2; p >= 0; --p) {
        const int64_t j = p + 1;
        down += q[j - 1] * (static_cast<double>(n - j) / nk) * (s[j] - s[j - 1]);
        w[p] = -down;
    }
    double acc = 0.0;  // ... then gains the prefix sum over j <= p
    for (int64_t p = 0; p < n; ++p) {
        if (p > 0) acc += up[p] * (s[p] - s[p - 1]);
        w[p] = static_cast<double>(k) * (acc + w[p]);
    }
}

template <typename T>
void one_group(const T* v, int64_t n, int64_t k, Estimator est, Workspace<T>& ws, T* out) {
    if (k == 1 && est != Estimator::pkpo_loo && est != Estimator::ordergrad) {
        // rspo, plugin and pkpo all reduce to the plain policy gradient w_i = R_i.
        std::copy(v, v + n, out);
        return;
    }
    ws.prepare(n, k, est);
    ws.sorter.sort(v, n);
    const uint32_t* idx = ws.sorter.index();
    double* s = ws.s.data();
    double* w = ws.w.data();
    for (int64_t p = 0; p < n; ++p) s[p] = static_cast<double>(v[idx[p]]);
    switch (est) {
        case Estimator::rspo:
            rspo_sorted(s, ws.q.data(), n, k, w);
            break;
        case Estimator::plugin:
            plugin_sorted(s, n, k, w);
            break;
        case Estimator::pkpo:
        case Estimator::pkpo_loo:
            pkpo_sorted(ws, n, k, est == Estimator::pkpo_loo, w);
            break;
        case Estimator::ordergrad:
            ordergrad_sorted(s, ws.q.data(), ws.up.data(), n, k, w);
            break;
        case Estimator::hitchhiking:  // rejected before the parallel region (no throwing inside it)
        case Estimator::passk_training_std:
            break;
    }
    for (int64_t p = 0; p < n; ++p) out[idx[p]] = static_cast<T>(w[p]);
}

}  // namespace

template <typename T>
void max_at_k_weights(const T* values, const int64_t* offsets, int64_t num_groups, int64_t k, Estimator est, T* out) {
    if (est == Estimator::hitchhiking) throw std::invalid_argument("use hitchhiking_weights");
    if (est == Estimator::passk_training_std)
        throw std::invalid_argument("the passk_training_std estimator is defined for Pass@k (binary rewards) only");
    const int64_t common =
        check_groups(offsets, num_groups, k, est == Estimator::pkpo_loo || est == Estimator::ordergrad);
    const int64_t total = offsets[num_groups];
#pragma omp parallel if (total >= kParallelMinSamples && num_groups > 1)
    {
        Workspace<T> ws;
        if (common > 0) {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < num_groups; ++g)
                one_group(values + offsets[g], common, k, est, ws, out + offsets[g]);
        } else {
#pragma omp for schedule(dynamic, 8)
            for (int64_t g = 0; g < num_groups; ++g)
                one_group(values + offsets[g], offsets[g + 1] - offsets[g], k, est, ws, out + offsets[g]);
        }
    }
}

template void max_at_k_weights<float>(const float*, const int64_t*, int64_t, int64_t, Estimator, float*);
template void max_at_k_weights<double>(const double*, const int64_t*, int64_t, int64_t, Estimator, double*);

}  // namespace rspo
