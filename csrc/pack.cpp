// Sequence packing for the trainer: first-fit-decreasing bin packing of sequence lengths into token budgets.
#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "common.h"

namespace fastrlhf {

// lengths: int64[N]; budget: tokens per bin -> int64[N], the bin index of each sequence.
// Sequences are placed longest first (ties: lower index first), each into the first open bin with room; bins are numbered
// in the order they are opened, so the result is deterministic.
static py::array_t<int64_t> pack_sequences(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
                                           int64_t budget) {
    if (lengths.ndim() != 1)
        throw py::value_error("pack_sequences: lengths must be 1-D [N], got shape " + shape_str(lengths));
    if (budget <= 0) throw py::value_error("pack_sequences: budget must be > 0, got " + std::to_string(budget));
    const py::ssize_t n = lengths.size();
    const int64_t* len = lengths.data();
    for (py::ssize_t i = 0; i < n; ++i) {
        if (len[i] < 0)
            throw py::value_error("pack_sequences: sequence " + std::to_string(i) + " has negative length " +
                                  std::to_string(len[i]));
        if (len[i] > budget)
            throw py::value_error("pack_sequences: sequence " + std::to_string(i) + " has length " +
                                  std::to_string(len[i]) + " > budget " + std::to_string(budget));
    }
    py::array_t<int64_t> bins(n);
    int64_t* out = bins.mutable_data();
    {
        py::gil_scoped_release nogil;
        std::vector<py::ssize_t> order(static_cast<size_t>(n));
        std::iota(order.begin(), order.end(), py::ssize_t{0});
        std::stable_sort(order.begin(), order.end(), [len](py::ssize_t a, py::ssize_t b) { return len[a] > len[b]; });
        std::vector<int64_t> room;  // free tokens left in each open bin
        for (py::ssize_t i : order) {
            size_t k = 0;
            while (k < room.size() && room[k] < len[i]) ++k;  // first fit
            if (k == room.size()) room.push_back(budget);     // no bin has room: open a new one
            room[k] -= len[i];
            out[i] = static_cast<int64_t>(k);
        }
    }
    return bins;
}

void register_pack(py::module_& m) {
    m.def("pack_sequences", &pack_sequences, py::arg("lengths"), py::arg("budget"),
          "First-fit-decreasing packing. lengths: int64[N], budget: max tokens per bin -> int64[N] bin index per "
          "sequence. Raises ValueError naming a sequence longer than the budget.");
}

}  // namespace fastrlhf
