// GAE over the valid tokens of each row (masked reverse scan), on numpy buffers. Math: docs/kernels.md "GAE over valid tokens".
#include <cmath>
#include <utility>

#include "common.h"

namespace fastrlhf {

// rewards, values: f32[B, T]; mask: bool/u8/f32[B, T] -> (advantages f32[B, T], returns f32[B, T]).
static std::pair<py::array_t<float>, py::array_t<float>> gae(f32_array rewards, f32_array values, py::array mask,
                                                             double gamma, double lam) {
    if (rewards.ndim() != 2) throw py::value_error("gae: rewards must be 2-D [B, T], got shape " + shape_str(rewards));
    if (!same_shape(rewards, values) || !same_shape(rewards, mask))
        throw py::value_error("gae: shape mismatch: rewards" + shape_str(rewards) + ", values" + shape_str(values) +
                              ", mask" + shape_str(mask));
    if (!std::isfinite(gamma) || !std::isfinite(lam)) throw py::value_error("gae: gamma and lam must be finite");
    const py::ssize_t B = rewards.shape(0), T = rewards.shape(1);
    const std::vector<uint8_t> m = mask_bytes("gae", mask);
    py::array_t<float> adv({B, T}), ret({B, T});
    const float* r = rewards.data();
    const float* v = values.data();
    float* a_out = adv.mutable_data();
    float* r_out = ret.mutable_data();
    const uint8_t* mp = m.data();
    {
        py::gil_scoped_release nogil;
        const double gl = gamma * lam;
        for (py::ssize_t b = 0; b < B; ++b) {
            double v_next = 0.0, a_next = 0.0;  // V and A at the next valid position (0 beyond the last one)
            for (py::ssize_t t = T - 1; t >= 0; --t) {
                const py::ssize_t i = b * T + t;
                if (!mp[i]) {  // padding / hole: A = R = 0, the state carries through to the previous valid token
                    a_out[i] = 0.0f;
                    r_out[i] = 0.0f;
                    continue;
                }
                const double delta = r[i] + gamma * v_next - v[i];  // δ_t = r_t + γ·V_next(t) − V_t
                const double a = delta + gl * a_next;                // A_t = δ_t + γλ·A_next(t)
                a_out[i] = static_cast<float>(a);
                r_out[i] = static_cast<float>(a + v[i]);  // R_t = A_t + V_t
                v_next = v[i];
                a_next = a;
            }
        }
    }
    return {adv, ret};
}

void register_gae(py::module_& m) {
    m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam"),
          "GAE over valid tokens. rewards, values: f32[B, T]; mask: bool/u8/f32[B, T] -> (advantages, returns) f32[B, T]. "
          "Masked positions are skipped (holes carry the state) and get A = R = 0. Accumulates in double.");
}

}  // namespace fastrlhf
