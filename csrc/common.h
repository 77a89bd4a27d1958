// Shared helpers for the fastrlhf._C ops: argument checks that raise clear Python errors.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace fastrlhf {

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

inline std::string shape_str(const py::array& a) {
    std::string s = "[";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

inline bool same_shape(const py::array& a, const py::array& b) {
    if (a.ndim() != b.ndim()) return false;
    for (py::ssize_t i = 0; i < a.ndim(); ++i)
        if (a.shape(i) != b.shape(i)) return false;
    return true;
}

// A mask as a contiguous 0/1 byte buffer: accepts bool/uint8 (copied as is, nonzero = valid) or float32 (nonzero = valid).
// Any other dtype raises TypeError naming the function and the argument.
inline std::vector<uint8_t> mask_bytes(const char* fn, const py::array& mask) {
    const char kind = mask.dtype().kind();
    const auto n = static_cast<size_t>(mask.size());
    std::vector<uint8_t> out(n);
    if ((kind == 'b' || kind == 'u') && mask.itemsize() == 1) {
        auto c = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(mask);
        const uint8_t* p = c.data();
        for (size_t i = 0; i < n; ++i) out[i] = p[i] != 0;
    } else if (kind == 'f' && mask.itemsize() == 4) {
        auto c = f32_array::ensure(mask);
        const float* p = c.data();
        for (size_t i = 0; i < n; ++i) out[i] = p[i] != 0.0f;
    } else {
        throw py::type_error(std::string(fn) + ": mask must be bool/uint8 or float32, got dtype " +
                             std::string(py::str(mask.dtype())));
    }
    return out;
}

}  // namespace fastrlhf
