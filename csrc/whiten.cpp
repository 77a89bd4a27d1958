// Masked whitening on numpy buffers (two-pass mean / variance in double). Math: docs/kernels.md "Whitening (masked)".
#include <cmath>

#include "common.h"

namespace fastrlhf {

// x: f32[...]; mask: bool/u8/f32 of x's shape -> f32 of x's shape.
static py::array_t<float> whiten(f32_array x, py::array mask, bool shift_mean, double eps) {
    if (!same_shape(x, mask))
        throw py::value_error("whiten: shape mismatch: x" + shape_str(x) + ", mask" + shape_str(mask));
    if (!(eps >= 0.0) || !std::isfinite(eps)) throw py::value_error("whiten: eps must be finite and >= 0");
    const std::vector<uint8_t> m = mask_bytes("whiten", mask);
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    py::array_t<float> out(shape);
    const py::ssize_t n = x.size();
    const float* xp = x.data();
    float* op = out.mutable_data();
    const uint8_t* mp = m.data();
    {
        py::gil_scoped_release nogil;
        double count = 0.0, sum = 0.0;
        for (py::ssize_t i = 0; i < n; ++i)
            if (mp[i]) {
                count += 1.0;
                sum += xp[i];
            }
        const double mean = count > 0.0 ? sum / count : 0.0;  // μ = Σ x m / Σ m  (0 for an empty mask)
        double m2 = 0.0;
        for (py::ssize_t i = 0; i < n; ++i)
            if (mp[i]) m2 += (xp[i] - mean) * (xp[i] - mean);  // second pass: Σ (x − μ)² m
        const double var = count >= 2.0 ? m2 / (count - 1.0) : 0.0;  // σ² = Σ (x − μ)² m / (Σ m − 1), 0 when Σ m < 2
        const double rstd = 1.0 / std::sqrt(var + eps);
        const double back = shift_mean ? 0.0 : mean;  // shift_mean=False adds μ back at valid positions
        for (py::ssize_t i = 0; i < n; ++i)
            op[i] = mp[i] ? static_cast<float>((xp[i] - mean) * rstd + back) : 0.0f;  // (x − μ)·rsqrt(σ² + eps)·m
    }
    return out;
}

void register_whiten(py::module_& m) {
    m.def("whiten", &whiten, py::arg("x"), py::arg("mask"), py::arg("shift_mean") = true, py::arg("eps") = 1e-8,
          "Masked whitening. x: f32[...]; mask: bool/u8/f32 of x's shape -> f32 of x's shape; masked positions are 0.");
}

}  // namespace fastrlhf
