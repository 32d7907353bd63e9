// dsel._C: the native token loader (Megatron .bin/.idx and headerless memmaps).
#include <pybind11/pybind11.h>

#include "mapped.h"

namespace dsel {
void bind_gather(pybind11::module_& m);
void bind_writer(pybind11::module_& m);
}  // namespace dsel

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsel native token loader";
  pybind11::register_exception<dsel::FormatError>(m, "FormatError", PyExc_ValueError);
  dsel::bind_gather(m);
  dsel::bind_writer(m);
}
