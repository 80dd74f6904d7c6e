// Rollout cache for PPO on DDIM trajectories (ATen only: the same source serves CPU and CUDA).
//
// One rollout of B trajectories with T network calls each is stored as
//   states     [T, B, *sample_shape]    state_dtype (f32 | bf16); state i (i in [1, T], row i-1) =
//                                       the action x_prev of call i-1 = the input of call i (shared,
//                                       no copies). State 0, the start x_T, is not stored: its owner
//                                       (the trainer) keeps it unrounded, so every pass reads it exactly
//   log_probs  [T, B] f64               old log pi(x_{i+1} | x_i) (float64: PPO log-ratios are
//                                       differences of two such totals, ~1e4 each at 3x32x32)
//   timesteps  [T] i64, sigmas [T] f32  the DDIM schedule of the calls
//   rewards    [B] f32, group_ids [B] i64, advantages [B] f32
// Recording copies into this storage in place (no allocation: CUDA-graph capturable).
// Index plans come from a host splitmix64 stream + Fisher-Yates, identical on every platform.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ppo_ddpm {

// splitmix64 (Steele, Lea, Flood 2014): state += golden gamma, then a 64-bit finalizer.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next();
  // Uniform integer in [0, n) by rejection (no modulo bias); n >= 1.
  uint64_t below(uint64_t n);

 private:
  uint64_t state_;
};

// A state_dict split by value kind: tensors, ints and int lists (e.g. sample_shape).
struct StateDict {
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, int64_t> ints;
  std::map<std::string, std::vector<int64_t>> int_lists;
};

// Seed salts so that the minibatch and the timestep plan of one seed use unrelated streams.
constexpr uint64_t kMinibatchSalt = 0x6D696E6962617463ULL;  // "minibatc"
constexpr uint64_t kTimestepSalt = 0x74696D6573746570ULL;   // "timestep"

// Global advantage normalization: (r - mean) / (std + eps), std the population std
// (divide by N), computed in float64, then clamped to [-adv_clip, adv_clip]; returns f32.
at::Tensor normalize_advantages(const at::Tensor& rewards, double eps, std::optional<double> adv_clip);

// Per-group reward statistics with a ring buffer of the last buffer_size rewards per group
// (DDPO's per-prompt stat tracker). Host-side, float64.
class GroupStatTracker {
 public:
  GroupStatTracker(int64_t buffer_size, int64_t min_count);

  // adv_n = (r_n - mean_g) / (std_g + eps) with the statistics of group g's buffer (the last
  // buffer_size rewards of earlier batches) together with this batch's rewards of group g, if those
  // are >= min_count values, else the batch-global ones; clamped to [-adv_clip, adv_clip]. Then every
  // reward (in index order) is pushed into its group's ring buffer.
  // group_ids [N] integer, rewards [N] floating -> [N] f32 on the rewards' device.
  at::Tensor update(const at::Tensor& group_ids, const at::Tensor& rewards, double eps,
                    std::optional<double> adv_clip);

  int64_t num_groups() const { return static_cast<int64_t>(groups_.size()); }
  int64_t buffer_size() const { return buffer_size_; }
  int64_t min_count() const { return min_count_; }

  // Tensors: group_ids [G] i64 (ascending), buffers [G, buffer_size] f64 (ring slots),
  // counts [G] i64 (filled slots), heads [G] i64 (next slot to write). Ints: buffer_size, min_count.
  StateDict state_dict() const;
  void load_state_dict(const StateDict& d);

 private:
  struct Ring {
    std::vector<double> slots;
    int64_t count = 0;
    int64_t head = 0;
  };
  int64_t buffer_size_;
  int64_t min_count_;
  std::map<int64_t, Ring> groups_;
};

class RolloutCache {
 public:
  RolloutCache(int64_t num_steps, int64_t batch_size, std::vector<int64_t> sample_shape,
               at::ScalarType state_dtype, at::Device device);

  // state i <- x (cast to state_dtype); i in [1, T], x [B, *sample_shape] on the cache's device.
  void record_state(int64_t i, const at::Tensor& x);
  // log_probs[i] <- lp (cast to f64); i in [0, T-1], lp [B] on the cache's device.
  void record_logprob(int64_t i, const at::Tensor& lp);
  // View of state i = states[i - 1], i in [1, T].
  at::Tensor state(int64_t i) const;

  // Setters copy (casting) from any device.
  void set_schedule(const at::Tensor& timesteps, const at::Tensor& sigmas);
  void set_rewards(const at::Tensor& rewards, const at::Tensor& group_ids);
  void set_advantages(const at::Tensor& advantages);

  // [M, B/M] i64: a seeded permutation of 0..B-1 split into M minibatches (B % M == 0).
  at::Tensor minibatch_plan(int64_t seed, int64_t num_minibatches) const;
  // [B, K] i64: row b = the first K entries of an independent seeded permutation of ``steps``
  // (1-D integer, distinct step indices in [0, T-1]: the trained steps).
  at::Tensor timestep_plan(int64_t seed, int64_t num_train_steps, const at::Tensor& steps) const;

  int64_t nbytes() const;
  // Tensors (the cache's own storage, not copies), ints num_steps, batch_size, list sample_shape.
  StateDict state_dict() const;
  // Validates keys, shapes and dtypes, then copies (from any device) into the cache's storage.
  void load_state_dict(const StateDict& d);

  int64_t num_steps() const { return T_; }
  int64_t batch_size() const { return B_; }
  const std::vector<int64_t>& sample_shape() const { return sample_shape_; }
  at::ScalarType state_dtype() const { return states_.scalar_type(); }
  at::Device device() const { return states_.device(); }

  const at::Tensor& states() const { return states_; }
  const at::Tensor& log_probs() const { return log_probs_; }
  const at::Tensor& timesteps() const { return timesteps_; }
  const at::Tensor& sigmas() const { return sigmas_; }
  const at::Tensor& rewards() const { return rewards_; }
  const at::Tensor& group_ids() const { return group_ids_; }
  const at::Tensor& advantages() const { return advantages_; }

 private:
  int64_t T_, B_;
  std::vector<int64_t> sample_shape_;
  at::Tensor states_, log_probs_, timesteps_, sigmas_, rewards_, group_ids_, advantages_;
};

}  // namespace ppo_ddpm
