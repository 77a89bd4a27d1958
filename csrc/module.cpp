// fastrlhf._C: CPU implementations on plain buffers (numpy arrays); no torch C++ API.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastrlhf CPU ops (GAE reverse scan, masked whitening, sequence packing)";
}
