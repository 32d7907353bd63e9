// dsel._C: the native token loader. Stage modules add their bindings in their own files.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsel native token loader";
}
