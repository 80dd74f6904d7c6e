// Rollout cache, advantage normalization and per-group stat tracker (see rollout_cache.h).
// ppo_ddpm/rollout_cache.py holds the pure-Python reference with the same maths and messages.
#include "rollout_cache.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

// Keep a*b+c as two roundings (no FMA) so the float64 statistics match the Python reference bit for bit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace ppo_ddpm {
namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_integer(at::ScalarType t) { return at::isIntegralType(t, /*includeBool=*/false); }

void check_shape(const std::string& where, const char* name, const at::Tensor& t,
                 at::IntArrayRef expected, const std::string& meaning) {
  TORCH_CHECK_VALUE(t.sizes() == expected, where, ": ", name, " has shape ", t.sizes(), " but expected ",
                    expected, " (", meaning, ")");
}

void check_floating(const std::string& where, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), where, ": ", name,
                   " must be a floating tensor, got ", dtype_name(t.scalar_type()));
}

void check_integer(const std::string& where, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_integer(t.scalar_type()), where, ": ", name, " must be an integer tensor, got ",
                   dtype_name(t.scalar_type()));
}

void check_device(const std::string& where, const char* name, const at::Tensor& t, at::Device device) {
  TORCH_CHECK_VALUE(t.device() == device, where, ": ", name, " is on ", t.device().str(),
                    " but the cache is on ", device.str());
}

void check_index(const std::string& where, int64_t i, int64_t lo, int64_t hi, const std::string& what) {
  TORCH_CHECK_INDEX(i >= lo && i <= hi, where, ": index i=", i, " out of range [", lo, ", ", hi, "] (", what, ")");
}

// The stored states are 1..T (state 0, x_T, is its owner's).
std::string states_what(int64_t T) {
  return "states 1..T for num_steps T=" + std::to_string(T) + "; state 0 (x_T) is not stored";
}

// Moves the first k entries of a[0..n) into a uniformly random order of a random k-subset
// (forward Fisher-Yates; with k = n - 1 the whole array is a uniform permutation).
void partial_shuffle(SplitMix64& rng, int64_t* a, int64_t n, int64_t k) {
  for (int64_t i = 0; i < std::min(k, n - 1); ++i) {
    const int64_t j = i + static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - i)));
    std::swap(a[i], a[j]);
  }
}

// Population mean and std (divide by n), summed in index order in float64.
std::pair<double, double> mean_std(const double* v, int64_t n) {
  double s = 0.0;
  for (int64_t k = 0; k < n; ++k) s += v[k];
  const double mean = s / static_cast<double>(n);
  double ss = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    const double d = v[k] - mean;
    const double d2 = d * d;
    ss += d2;
  }
  return {mean, std::sqrt(ss / static_cast<double>(n))};
}

void check_adv_args(const std::string& where, double eps, std::optional<double> adv_clip) {
  TORCH_CHECK_VALUE(eps >= 0.0, where, ": eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(!adv_clip || *adv_clip > 0.0, where, ": adv_clip must be > 0 or None, got ",
                    adv_clip.value_or(0.0));
}

template <typename V>
const V& require_key(const std::map<std::string, V>& m, const std::string& where, const std::string& key,
                     const char* kind) {
  auto it = m.find(key);
  TORCH_CHECK_VALUE(it != m.end(), where, ": state_dict is missing ", kind, " key '", key, "'");
  return it->second;
}

template <typename V>
void reject_unexpected(const std::map<std::string, V>& m, const std::string& where,
                       const std::set<std::string>& allowed, const char* kind) {
  for (const auto& kv : m) {
    TORCH_CHECK_VALUE(allowed.count(kv.first), where, ": unexpected ", kind, " key '", kv.first,
                      "' in state_dict");
  }
}

void check_loaded(const std::string& where, const std::string& key, const at::Tensor& src,
                  const at::Tensor& dst) {
  TORCH_CHECK_VALUE(src.sizes() == dst.sizes(), where, ": state_dict['", key, "'] has shape ", src.sizes(),
                    " but expected ", dst.sizes());
  TORCH_CHECK_TYPE(src.scalar_type() == dst.scalar_type(), where, ": state_dict['", key, "'] has dtype ",
                   dtype_name(src.scalar_type()), " but expected ", dtype_name(dst.scalar_type()));
}

}  // namespace

// ---------------------------------------------------------------- RNG

uint64_t SplitMix64::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::below(uint64_t n) {
  const uint64_t reject_below = (0 - n) % n;  // 2^64 mod n: [reject_below, 2^64) has a multiple of n values
  while (true) {
    const uint64_t r = next();
    if (r >= reject_below) return r % n;
  }
}

// ---------------------------------------------------------------- advantages

at::Tensor normalize_advantages(const at::Tensor& rewards, double eps, std::optional<double> adv_clip) {
  const std::string where = "normalize_advantages";
  check_floating(where, "rewards", rewards);
  TORCH_CHECK_VALUE(rewards.dim() == 1 && rewards.numel() >= 1, where,
                    ": rewards must have shape [B] with B >= 1, got ", rewards.sizes());
  check_adv_args(where, eps, adv_clip);
  const at::Tensor r = rewards.to(at::kDouble);
  const at::Tensor centered = r - r.mean();
  const at::Tensor std = centered.pow(2).mean().sqrt();
  at::Tensor adv = centered / (std + eps);
  if (adv_clip) adv = adv.clamp(-*adv_clip, *adv_clip);
  return adv.to(at::kFloat);
}

GroupStatTracker::GroupStatTracker(int64_t buffer_size, int64_t min_count)
    : buffer_size_(buffer_size), min_count_(min_count) {
  TORCH_CHECK_VALUE(buffer_size >= 1, "GroupStatTracker: buffer_size must be >= 1, got ", buffer_size);
  TORCH_CHECK_VALUE(min_count >= 0 && min_count <= buffer_size,
                    "GroupStatTracker: min_count must be in [0, buffer_size=", buffer_size, "], got ", min_count);
}

at::Tensor GroupStatTracker::update(const at::Tensor& group_ids, const at::Tensor& rewards, double eps,
                                    std::optional<double> adv_clip) {
  const std::string where = "GroupStatTracker.update";
  check_integer(where, "group_ids", group_ids);
  check_floating(where, "rewards", rewards);
  TORCH_CHECK_VALUE(rewards.dim() == 1 && rewards.numel() >= 1, where,
                    ": rewards must have shape [N] with N >= 1, got ", rewards.sizes());
  check_shape(where, "group_ids", group_ids, rewards.sizes(), "one group id per reward");
  check_adv_args(where, eps, adv_clip);

  const at::Tensor g = group_ids.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor r = rewards.to(at::kCPU, at::kDouble).contiguous();
  const int64_t n = r.numel();
  const int64_t* gp = g.data_ptr<int64_t>();
  const double* rp = r.data_ptr<double>();

  // Statistics of each group over (its buffer before this batch) + (its rewards in this batch).
  std::map<int64_t, std::vector<double>> values;
  for (int64_t k = 0; k < n; ++k) {
    auto [it, inserted] = values.try_emplace(gp[k]);
    if (inserted) {
      auto ring = groups_.find(gp[k]);
      if (ring != groups_.end()) it->second.assign(ring->second.slots.begin(), ring->second.slots.begin() + ring->second.count);
    }
    it->second.push_back(rp[k]);
  }
  const auto global = mean_std(rp, n);
  std::map<int64_t, std::pair<double, double>> stats;
  for (const auto& [gid, v] : values) {
    const int64_t count = static_cast<int64_t>(v.size());
    stats[gid] = count >= min_count_ ? mean_std(v.data(), count) : global;
  }

  for (int64_t k = 0; k < n; ++k) {
    auto [it, inserted] = groups_.try_emplace(gp[k]);
    Ring& ring = it->second;
    if (inserted) ring.slots.assign(static_cast<size_t>(buffer_size_), 0.0);
    ring.slots[static_cast<size_t>(ring.head)] = rp[k];
    ring.head = (ring.head + 1) % buffer_size_;
    ring.count = std::min(ring.count + 1, buffer_size_);
  }

  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  for (int64_t k = 0; k < n; ++k) {
    const auto [mean, std] = stats.at(gp[k]);
    double a = (rp[k] - mean) / (std + eps);
    if (adv_clip) a = std::min(std::max(a, -*adv_clip), *adv_clip);
    op[k] = static_cast<float>(a);
  }
  return out.to(rewards.device());
}

StateDict GroupStatTracker::state_dict() const {
  const int64_t G = num_groups();
  at::Tensor ids = at::empty({G}, at::kLong), counts = at::empty({G}, at::kLong);
  at::Tensor heads = at::empty({G}, at::kLong), buffers = at::empty({G, buffer_size_}, at::kDouble);
  int64_t k = 0;
  for (const auto& [gid, ring] : groups_) {
    ids.data_ptr<int64_t>()[k] = gid;
    counts.data_ptr<int64_t>()[k] = ring.count;
    heads.data_ptr<int64_t>()[k] = ring.head;
    std::copy(ring.slots.begin(), ring.slots.end(), buffers.data_ptr<double>() + k * buffer_size_);
    ++k;
  }
  StateDict d;
  d.tensors = {{"group_ids", ids}, {"buffers", buffers}, {"counts", counts}, {"heads", heads}};
  d.ints = {{"buffer_size", buffer_size_}, {"min_count", min_count_}};
  return d;
}

void GroupStatTracker::load_state_dict(const StateDict& d) {
  const std::string where = "GroupStatTracker.load_state_dict";
  reject_unexpected(d.tensors, where, {"group_ids", "buffers", "counts", "heads"}, "tensor");
  reject_unexpected(d.ints, where, {"buffer_size", "min_count"}, "int");
  reject_unexpected(d.int_lists, where, {}, "list");
  for (const char* key : {"buffer_size", "min_count"}) {
    const int64_t got = require_key(d.ints, where, key, "int");
    const int64_t own = std::string(key) == "buffer_size" ? buffer_size_ : min_count_;
    TORCH_CHECK_VALUE(got == own, where, ": state_dict['", key, "']=", got, " but this tracker has ", key, "=",
                      own);
  }
  const at::Tensor ids = require_key(d.tensors, where, "group_ids", "tensor");
  TORCH_CHECK_VALUE(ids.dim() == 1, where, ": state_dict['group_ids'] must have shape [G], got ", ids.sizes());
  const int64_t G = ids.size(0);
  const std::map<std::string, std::pair<std::vector<int64_t>, at::ScalarType>> spec = {
      {"group_ids", {{G}, at::kLong}},
      {"buffers", {{G, buffer_size_}, at::kDouble}},
      {"counts", {{G}, at::kLong}},
      {"heads", {{G}, at::kLong}}};
  std::map<std::string, at::Tensor> host;
  for (const auto& [key, shape_dtype] : spec) {
    const at::Tensor t = require_key(d.tensors, where, key, "tensor");
    check_loaded(where, key, t, at::empty(shape_dtype.first, shape_dtype.second));
    host[key] = t.to(at::kCPU).contiguous();
  }
  std::map<int64_t, Ring> groups;
  for (int64_t k = 0; k < G; ++k) {
    const int64_t gid = host["group_ids"][k].item<int64_t>();
    const int64_t count = host["counts"][k].item<int64_t>();
    const int64_t head = host["heads"][k].item<int64_t>();
    TORCH_CHECK_VALUE(count >= 0 && count <= buffer_size_, where, ": state_dict['counts'][", k, "]=", count,
                      " not in [0, ", buffer_size_, "]");
    TORCH_CHECK_VALUE(head >= 0 && head < buffer_size_, where, ": state_dict['heads'][", k, "]=", head,
                      " not in [0, ", buffer_size_ - 1, "]");
    Ring ring;
    const double* slots = host["buffers"][k].data_ptr<double>();
    ring.slots.assign(slots, slots + buffer_size_);
    ring.count = count;
    ring.head = head;
    TORCH_CHECK_VALUE(groups.emplace(gid, std::move(ring)).second, where,
                      ": state_dict['group_ids'] has duplicate id ", gid);
  }
  groups_ = std::move(groups);
}

// ---------------------------------------------------------------- RolloutCache

RolloutCache::RolloutCache(int64_t num_steps, int64_t batch_size, std::vector<int64_t> sample_shape,
                           at::ScalarType state_dtype, at::Device device)
    : T_(num_steps), B_(batch_size), sample_shape_(std::move(sample_shape)) {
  const std::string where = "RolloutCache";
  TORCH_CHECK_VALUE(T_ >= 1, where, ": num_steps must be >= 1, got ", T_);
  TORCH_CHECK_VALUE(B_ >= 1, where, ": batch_size must be >= 1, got ", B_);
  for (int64_t d : sample_shape_) {
    TORCH_CHECK_VALUE(d >= 1, where, ": sample_shape entries must be >= 1, got ", at::IntArrayRef(sample_shape_));
  }
  TORCH_CHECK_TYPE(state_dtype == at::kFloat || state_dtype == at::kBFloat16, where,
                   ": state_dtype must be torch.float32 or torch.bfloat16, got ", dtype_name(state_dtype));
  std::vector<int64_t> states_shape = {T_, B_};
  states_shape.insert(states_shape.end(), sample_shape_.begin(), sample_shape_.end());
  const auto opts = at::TensorOptions().device(device);
  states_ = at::zeros(states_shape, opts.dtype(state_dtype));
  log_probs_ = at::zeros({T_, B_}, opts.dtype(at::kDouble));
  timesteps_ = at::zeros({T_}, opts.dtype(at::kLong));
  sigmas_ = at::zeros({T_}, opts.dtype(at::kFloat));
  rewards_ = at::zeros({B_}, opts.dtype(at::kFloat));
  group_ids_ = at::zeros({B_}, opts.dtype(at::kLong));
  advantages_ = at::zeros({B_}, opts.dtype(at::kFloat));
}

void RolloutCache::record_state(int64_t i, const at::Tensor& x) {
  const std::string where = "RolloutCache.record_state";
  check_index(where, i, 1, T_, states_what(T_));
  check_floating(where, "x", x);
  check_shape(where, "x", x, states_.sizes().slice(1), "[B, *sample_shape]");
  check_device(where, "x", x, device());
  states_.select(0, i - 1).copy_(x);
}

void RolloutCache::record_logprob(int64_t i, const at::Tensor& lp) {
  const std::string where = "RolloutCache.record_logprob";
  check_index(where, i, 0, T_ - 1, "num_steps T=" + std::to_string(T_));
  check_floating(where, "lp", lp);
  check_shape(where, "lp", lp, {B_}, "[B]");
  check_device(where, "lp", lp, device());
  log_probs_.select(0, i).copy_(lp);
}

at::Tensor RolloutCache::state(int64_t i) const {
  check_index("RolloutCache.state", i, 1, T_, states_what(T_));
  return states_.select(0, i - 1);
}

void RolloutCache::set_schedule(const at::Tensor& timesteps, const at::Tensor& sigmas) {
  const std::string where = "RolloutCache.set_schedule";
  check_integer(where, "timesteps", timesteps);
  check_floating(where, "sigmas", sigmas);
  check_shape(where, "timesteps", timesteps, {T_}, "[T]");
  check_shape(where, "sigmas", sigmas, {T_}, "[T]");
  timesteps_.copy_(timesteps);
  sigmas_.copy_(sigmas);
}

void RolloutCache::set_rewards(const at::Tensor& rewards, const at::Tensor& group_ids) {
  const std::string where = "RolloutCache.set_rewards";
  check_floating(where, "rewards", rewards);
  check_integer(where, "group_ids", group_ids);
  check_shape(where, "rewards", rewards, {B_}, "[B]");
  check_shape(where, "group_ids", group_ids, {B_}, "[B]");
  rewards_.copy_(rewards);
  group_ids_.copy_(group_ids);
}

void RolloutCache::set_advantages(const at::Tensor& advantages) {
  const std::string where = "RolloutCache.set_advantages";
  check_floating(where, "advantages", advantages);
  check_shape(where, "advantages", advantages, {B_}, "[B]");
  advantages_.copy_(advantages);
}

at::Tensor RolloutCache::minibatch_plan(int64_t seed, int64_t num_minibatches) const {
  const std::string where = "RolloutCache.minibatch_plan";
  const int64_t M = num_minibatches;
  TORCH_CHECK_VALUE(M >= 1 && B_ % M == 0, where, ": batch_size B=", B_,
                    " must be divisible by num_minibatches M=", M, " (M >= 1)");
  at::Tensor plan = at::arange(B_, at::kLong);
  SplitMix64 rng(static_cast<uint64_t>(seed) ^ kMinibatchSalt);
  partial_shuffle(rng, plan.data_ptr<int64_t>(), B_, B_ - 1);
  return plan.view({M, B_ / M}).to(device());
}

at::Tensor RolloutCache::timestep_plan(int64_t seed, int64_t num_train_steps, const at::Tensor& steps) const {
  const std::string where = "RolloutCache.timestep_plan";
  check_integer(where, "steps", steps);
  TORCH_CHECK_VALUE(steps.dim() == 1 && steps.numel() >= 1, where, ": steps must have shape [P] with P >= 1, got ",
                    steps.sizes());
  const at::Tensor host = steps.to(at::kCPU, at::kLong).contiguous();
  const int64_t n = host.numel(), K = num_train_steps;
  const int64_t* sp = host.data_ptr<int64_t>();
  std::set<int64_t> seen;
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK_VALUE(sp[k] >= 0 && sp[k] < T_, where, ": steps[", k, "]=", sp[k], " out of range [0, ", T_ - 1, "]");
    TORCH_CHECK_VALUE(seen.insert(sp[k]).second, where, ": steps has the step ", sp[k], " twice");
  }
  TORCH_CHECK_VALUE(K >= 1 && K <= n, where, ": num_train_steps K must be in [1, len(steps)=", n, "], got ", K);
  at::Tensor plan = at::empty({B_, K}, at::kLong);
  int64_t* out = plan.data_ptr<int64_t>();
  std::vector<int64_t> row(static_cast<size_t>(n));
  SplitMix64 rng(static_cast<uint64_t>(seed) ^ kTimestepSalt);
  for (int64_t b = 0; b < B_; ++b) {
    std::copy(sp, sp + n, row.begin());
    partial_shuffle(rng, row.data(), n, K);
    std::copy(row.begin(), row.begin() + K, out + b * K);
  }
  return plan.to(device());
}

int64_t RolloutCache::nbytes() const {
  int64_t total = 0;
  for (const auto& kv : state_dict().tensors) total += kv.second.nbytes();
  return total;
}

StateDict RolloutCache::state_dict() const {
  StateDict d;
  d.tensors = {{"states", states_},       {"log_probs", log_probs_}, {"timesteps", timesteps_},
               {"sigmas", sigmas_},       {"rewards", rewards_},     {"group_ids", group_ids_},
               {"advantages", advantages_}};
  d.ints = {{"num_steps", T_}, {"batch_size", B_}};
  d.int_lists = {{"sample_shape", sample_shape_}};
  return d;
}

void RolloutCache::load_state_dict(const StateDict& d) {
  const std::string where = "RolloutCache.load_state_dict";
  const StateDict own = state_dict();
  std::set<std::string> tensor_keys, int_keys;
  for (const auto& kv : own.tensors) tensor_keys.insert(kv.first);
  for (const auto& kv : own.ints) int_keys.insert(kv.first);
  reject_unexpected(d.tensors, where, tensor_keys, "tensor");
  reject_unexpected(d.ints, where, int_keys, "int");
  reject_unexpected(d.int_lists, where, {"sample_shape"}, "list");
  for (const auto& [key, value] : own.ints) {
    const int64_t got = require_key(d.ints, where, key, "int");
    TORCH_CHECK_VALUE(got == value, where, ": state_dict['", key, "']=", got, " but this cache has ", key, "=",
                      value);
  }
  const auto& shape = require_key(d.int_lists, where, "sample_shape", "list");
  TORCH_CHECK_VALUE(shape == sample_shape_, where, ": state_dict['sample_shape']=", at::IntArrayRef(shape),
                    " but this cache has sample_shape=", at::IntArrayRef(sample_shape_));
  for (const auto& [key, dst] : own.tensors) {
    check_loaded(where, key, require_key(d.tensors, where, key, "tensor"), dst);
  }
  for (const auto& [key, dst] : own.tensors) dst.copy_(d.tensors.at(key));
}

}  // namespace ppo_ddpm
