// belay_kernels._C.BoundTensors: whether a model still holds the tensors an averager
// planned its kernel calls on, checked at every step in one pass of C++.
//
// An averager plans once (belay_kernels/bound.py): the memory of every averaged tensor,
// and where the module keeps it (its owner's _parameters or _buffers dict and key). The
// model can stop using that memory in three ways: model.to() gives a parameter new .data
// (same object, other address); load_state_dict(assign=True) or fully_shard put other
// objects into the module's dicts; FSDP2 may give a DTensor parameter a new local shard.
// first_moved() looks for each of these, at a few nanoseconds per tensor, so a step's
// check costs no Python per tensor. Anything it finds sends the averager to its full
// checks in Python, which either explain the error or plan again.
#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace belay {
namespace {

struct Memory {
  const void* address = nullptr;
  std::vector<int64_t> sizes;
  at::ScalarType dtype = at::kFloat;
};

class BoundTensors {
 public:
  // tables[i]: the dict the module keeps tensor i in (None for tensors given as a list),
  // keys[i] its key there, tensors[i] the tensor itself, local[i] whether it is a DTensor
  // whose local shard (_local_tensor) holds the memory.
  BoundTensors(py::list tables, py::list keys, py::list tensors, py::list local) {
    const size_t n = py::len(tensors);
    if (py::len(tables) != n || py::len(keys) != n || py::len(local) != n) {
      throw py::value_error("BoundTensors: tables, keys, tensors and local differ in length");
    }
    for (size_t i = 0; i < n; ++i) {
      Entry entry{py::reinterpret_borrow<py::object>(tables[i]),
                  py::reinterpret_borrow<py::object>(keys[i]),
                  py::reinterpret_borrow<py::object>(tensors[i]), local[i].cast<bool>(), {}};
      if (!entry.table.is_none() && !PyDict_Check(entry.table.ptr())) {
        throw py::type_error("BoundTensors: each table must be a dict or None");
      }
      if (!memory_of(entry, entry.memory)) {
        throw py::type_error("BoundTensors: each tensor (or its _local_tensor) must be a tensor");
      }
      entries_.push_back(std::move(entry));
    }
  }

  // The index of the first tensor the module no longer holds where it was planned, or -1.
  int64_t first_moved() const {
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& entry = entries_[i];
      if (!entry.table.is_none()) {
        PyObject* held = PyDict_GetItemWithError(entry.table.ptr(), entry.key.ptr());
        if (held == nullptr && PyErr_Occurred()) throw py::error_already_set();
        if (held != entry.tensor.ptr()) return static_cast<int64_t>(i);
      }
      if (!still_there(entry)) return static_cast<int64_t>(i);
    }
    return -1;
  }

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    py::object table;
    py::object key;
    py::object tensor;
    bool local;
    Memory memory;
  };

  // Where the entry's tensor keeps its elements now; false when that cannot be read (not a
  // tensor any more, or a tensor without storage), which counts as moved.
  static bool memory_of(const Entry& entry, Memory& out) {
    py::object holder = entry.tensor;
    if (entry.local) {
      holder = local_shard(entry);
      if (!holder) return false;
    }
    if (!THPVariable_Check(holder.ptr())) return false;
    const at::Tensor& tensor = THPVariable_Unpack(holder.ptr());
    try {
      out.address = tensor.const_data_ptr();
    } catch (const c10::Error&) {
      return false;
    }
    const auto sizes = tensor.sizes();
    out.sizes.assign(sizes.begin(), sizes.end());
    out.dtype = tensor.scalar_type();
    return true;
  }

  // memory_of(entry) == entry.memory, without copying anything. A planned tensor is a
  // tensor for good (the constructor checked), so only a DTensor's shard needs a check.
  static bool still_there(const Entry& entry) {
    py::object shard;
    PyObject* holder = entry.tensor.ptr();
    if (entry.local) {
      shard = local_shard(entry);
      if (!shard || !THPVariable_Check(shard.ptr())) return false;
      holder = shard.ptr();
    }
    const at::Tensor& tensor = THPVariable_Unpack(holder);
    const void* address = nullptr;
    try {
      address = tensor.const_data_ptr();
    } catch (const c10::Error&) {
      return false;
    }
    return address == entry.memory.address && tensor.scalar_type() == entry.memory.dtype &&
           tensor.sizes().equals(entry.memory.sizes);
  }

  static py::object local_shard(const Entry& entry) {
    PyObject* shard = PyObject_GetAttrString(entry.tensor.ptr(), "_local_tensor");
    if (shard == nullptr) PyErr_Clear();
    return py::reinterpret_steal<py::object>(shard);
  }

  std::vector<Entry> entries_;
};

}  // namespace

void register_bound_tensors(py::module_& m) {
  py::class_<BoundTensors>(m, "BoundTensors")
      .def(py::init<py::list, py::list, py::list, py::list>(), py::arg("tables"),
           py::arg("keys"), py::arg("tensors"), py::arg("local"))
      .def("first_moved", &BoundTensors::first_moved)
      .def("__len__", &BoundTensors::size);
}

}  // namespace belay
