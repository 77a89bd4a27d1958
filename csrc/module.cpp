// fastrlhf._C: CPU implementations on plain buffers (numpy arrays); no torch C++ API.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastrlhf {
void register_gae(py::module_& m);
void register_whiten(py::module_& m);
void register_pack(py::module_& m);
}  // namespace fastrlhf

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastrlhf CPU ops (GAE reverse scan, masked whitening, sequence packing)";
    fastrlhf::register_gae(m);
    fastrlhf::register_whiten(m);
    fastrlhf::register_pack(m);
}
