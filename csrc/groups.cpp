// Argument checks and name parsing shared by every kernel.
#include <string>

#include "rspo_kernels.hpp"

namespace rspo {

Objective parse_objective(const std::string& name) {
    if (name == "pass@k") return Objective::pass_at_k;
    if (name == "max@k") return Objective::max_at_k;
    throw std::invalid_argument("unknown objective '" + name + "'; expected 'pass@k' or 'max@k'");
}

Estimator parse_estimator(const std::string& name) {
    if (name == "rspo") return Estimator::rspo;
    if (name == "plugin") return Estimator::plugin;
    if (name == "hitchhiking") return Estimator::hitchhiking;
    if (name == "pkpo") return Estimator::pkpo;
    if (name == "pkpo_loo") return Estimator::pkpo_loo;
    if (name == "passk_training_std") return Estimator::passk_training_std;
    if (name == "ordergrad") return Estimator::ordergrad;
    throw std::invalid_argument("unknown estimator '" + name +
                                "'; expected one of rspo, plugin, hitchhiking, pkpo, pkpo_loo, passk_training_std, ordergrad");
}

namespace {

[[noreturn]] void throw_bad_group(int64_t g, int64_t n, int64_t k, bool strict) {
    const std::string where = "group " + std::to_string(g) + " has n=" + std::to_string(n) + " samples";
    const std::string kk = std::to_string(k);
    if (n < 1) throw std::invalid_argument(where + "; every group needs at least one");
    if (n > int64_t(UINT32_MAX)) throw std::invalid_argument(where + "; at most 2^32 - 1 are supported");
    if (k > n) throw std::invalid_argument(where + " but k=" + kk + " (k must be <= n)");
    if (strict && k >= n) throw std::invalid_argument(where + " but k=" + kk + " (needs k < n)");
    throw std::invalid_argument(where + ", not a multiple of k=" + kk);
}

}  // namespace

int64_t check_groups(const int64_t* offsets, int64_t num_groups, int64_t k, bool strict, bool divisible) {
    if (num_groups < 0) throw std::invalid_argument("negative number of groups");
    if (k < 1) throw std::invalid_argument("k=" + std::to_string(k) + " must be at least 1");
    if (offsets[0] != 0) throw std::invalid_argument("offsets[0] must be 0");
    int64_t common = num_groups > 0 ? offsets[1] - offsets[0] : 0;
    for (int64_t g = 0; g < num_groups; ++g) {
        const int64_t n = offsets[g + 1] - offsets[g];
        const bool bad = n < 1 || n > int64_t(UINT32_MAX) || k > n || (strict && k >= n) || (divisible && n % k != 0);
        if (bad) throw_bad_group(g, n, k, strict);  // builds its message only when needed
        if (n != common) common = -1;
    }
    return common;
}

}  // namespace rspo
