// Python face of the rollout cache: ppo_ddpm._C.{RolloutCache, GroupStatTracker, normalize_advantages}.
// Argument names and defaults match the pure-Python reference in ppo_ddpm/rollout_cache.py.
#include <torch/extension.h>

#include "rollout_cache.h"

namespace py = pybind11;
using ppo_ddpm::StateDict;

namespace {

py::dict to_python(const StateDict& d) {
  py::dict out;
  for (const auto& [k, v] : d.tensors) out[py::str(k)] = v;
  for (const auto& [k, v] : d.ints) out[py::str(k)] = v;
  for (const auto& [k, v] : d.int_lists) out[py::str(k)] = py::list(py::cast(v));
  return out;
}

StateDict from_python(const py::dict& d, const char* where) {
  StateDict out;
  for (const auto& [key_obj, value] : d) {
    TORCH_CHECK_TYPE(py::isinstance<py::str>(key_obj), where, ": state_dict keys must be str, got ",
                     std::string(py::str(key_obj.get_type().attr("__name__"))));
    const std::string key = py::cast<std::string>(key_obj);
    const bool is_int = py::isinstance<py::int_>(value) && !py::isinstance<py::bool_>(value);
    bool is_int_list = py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value);
    if (is_int_list) {
      for (const auto& e : value) is_int_list &= py::isinstance<py::int_>(e) && !py::isinstance<py::bool_>(e);
    }
    if (THPVariable_Check(value.ptr())) {
      out.tensors[key] = py::cast<at::Tensor>(value);
    } else if (is_int) {
      out.ints[key] = py::cast<int64_t>(value);
    } else if (is_int_list) {
      out.int_lists[key] = py::cast<std::vector<int64_t>>(value);
    } else {
      TORCH_CHECK_TYPE(false, where, ": state_dict['", key, "'] must be a tensor, an int or a list of ints, got ",
                       std::string(py::str(value.get_type().attr("__name__"))));
    }
  }
  return out;
}

at::Device as_device(const py::object& device) {
  return py::cast<at::Device>(py::module_::import("torch").attr("device")(device));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ rollout cache for PPO on DDIM trajectories (see csrc/rollout_cache.h).";

  m.def("normalize_advantages", &ppo_ddpm::normalize_advantages, py::arg("rewards"), py::arg("eps") = 1e-6,
        py::arg("adv_clip") = py::none(),
        "(r - mean) / (std + eps) with the population std, in float64, clamped to [-adv_clip, adv_clip]; [B] f32.");

  py::class_<ppo_ddpm::GroupStatTracker>(m, "GroupStatTracker")
      .def(py::init<int64_t, int64_t>(), py::arg("buffer_size"), py::arg("min_count"))
      .def("update", &ppo_ddpm::GroupStatTracker::update, py::arg("group_ids"), py::arg("rewards"),
           py::arg("eps") = 1e-6, py::arg("adv_clip") = py::none())
      .def("num_groups", &ppo_ddpm::GroupStatTracker::num_groups)
      .def_property_readonly("buffer_size", &ppo_ddpm::GroupStatTracker::buffer_size)
      .def_property_readonly("min_count", &ppo_ddpm::GroupStatTracker::min_count)
      .def("state_dict", [](const ppo_ddpm::GroupStatTracker& t) { return to_python(t.state_dict()); })
      .def(
          "load_state_dict",
          [](ppo_ddpm::GroupStatTracker& t, const py::dict& d) {
            t.load_state_dict(from_python(d, "GroupStatTracker.load_state_dict"));
          },
          py::arg("state_dict"));

  using ppo_ddpm::RolloutCache;
  py::class_<RolloutCache>(m, "RolloutCache")
      .def(py::init([](int64_t T, int64_t B, std::vector<int64_t> shape, at::ScalarType dtype,
                       const py::object& device) {
             return RolloutCache(T, B, std::move(shape), dtype, as_device(device));
           }),
           py::arg("num_steps"), py::arg("batch_size"), py::arg("sample_shape"),
           py::arg("state_dtype") = at::kFloat, py::arg("device") = "cpu")
      .def_property_readonly("states", &RolloutCache::states)
      .def_property_readonly("log_probs", &RolloutCache::log_probs)
      .def_property_readonly("timesteps", &RolloutCache::timesteps)
      .def_property_readonly("sigmas", &RolloutCache::sigmas)
      .def_property_readonly("rewards", &RolloutCache::rewards)
      .def_property_readonly("group_ids", &RolloutCache::group_ids)
      .def_property_readonly("advantages", &RolloutCache::advantages)
      .def_property_readonly("num_steps", &RolloutCache::num_steps)
      .def_property_readonly("batch_size", &RolloutCache::batch_size)
      .def_property_readonly("sample_shape",
                             [](const RolloutCache& c) { return py::tuple(py::cast(c.sample_shape())); })
      .def_property_readonly("state_dtype", &RolloutCache::state_dtype)
      .def_property_readonly("device", &RolloutCache::device)
      .def("record_state", &RolloutCache::record_state, py::arg("i"), py::arg("x"))
      .def("record_logprob", &RolloutCache::record_logprob, py::arg("i"), py::arg("lp"))
      .def("state", &RolloutCache::state, py::arg("i"))
      .def("set_schedule", &RolloutCache::set_schedule, py::arg("timesteps"), py::arg("sigmas"))
      .def("set_rewards", &RolloutCache::set_rewards, py::arg("rewards"), py::arg("group_ids"))
      .def("set_advantages", &RolloutCache::set_advantages, py::arg("advantages"))
      .def("minibatch_plan", &RolloutCache::minibatch_plan, py::arg("seed"), py::arg("num_minibatches"))
      .def("timestep_plan", &RolloutCache::timestep_plan, py::arg("seed"), py::arg("num_train_steps"),
           py::arg("steps"))
      .def("nbytes", &RolloutCache::nbytes)
      .def("state_dict", [](const RolloutCache& c) { return to_python(c.state_dict()); })
      .def(
          "load_state_dict",
          [](RolloutCache& c, const py::dict& d) { c.load_state_dict(from_python(d, "RolloutCache.load_state_dict")); },
          py::arg("state_dict"))
      .def("__repr__", [](const RolloutCache& c) {
        return py::str("RolloutCache(num_steps={}, batch_size={}, sample_shape={}, state_dtype={}, device={})")
            .format(c.num_steps(), c.batch_size(), py::tuple(py::cast(c.sample_shape())), c.state_dtype(),
                    c.device().str());
      });
}
