// Calling a templated kernel with the C++ integer type matching a numpy dtype or a Megatron code.
#pragma once

#include <pybind11/numpy.h>

#include <cstdint>
#include <string>

#include "mapped.h"

namespace dsel {

template <class T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the integer type T of a numpy dtype; anything else is a FormatError.
template <class F>
decltype(auto) with_int_type(const pybind11::dtype& dt, const std::string& what, F&& f) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'u') {
    if (size == 1) return f(Tag<uint8_t>{});
    if (size == 2) return f(Tag<uint16_t>{});
    if (size == 4) return f(Tag<uint32_t>{});
    if (size == 8) return f(Tag<uint64_t>{});
  } else if (kind == 'i') {
    if (size == 1) return f(Tag<int8_t>{});
    if (size == 2) return f(Tag<int16_t>{});
    if (size == 4) return f(Tag<int32_t>{});
    if (size == 8) return f(Tag<int64_t>{});
  }
  throw FormatError(what + ": token arrays must have an integer dtype, got " + std::string(pybind11::str(dt)));
}

// f(Tag<T>{}) for an integer Megatron dtype code (floats are not token types).
template <class F>
decltype(auto) with_code_type(int code, const std::string& what, F&& f) {
  switch (code) {
    case 1: return f(Tag<uint8_t>{});
    case 2: return f(Tag<int8_t>{});
    case 3: return f(Tag<int16_t>{});
    case 4: return f(Tag<int32_t>{});
    case 5: return f(Tag<int64_t>{});
    case 8: return f(Tag<uint16_t>{});
    default: throw FormatError(what + ": dtype code " + std::to_string(code) + " is not an integer token type");
  }
}

// Copy n tokens converting S -> O (a plain memcpy when the types agree; vectorised otherwise).
template <class S, class O>
inline void copy_tokens(const S* src, int64_t n, O* out) {
  if constexpr (std::is_same_v<S, O>) {
    std::memcpy(out, src, static_cast<size_t>(n) * sizeof(S));
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<O>(src[k]);
  }
}

}  // namespace dsel
