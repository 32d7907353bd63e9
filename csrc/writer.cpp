// Writer of Megatron indexed datasets, byte-identical to megatron-core's IndexedDatasetBuilder:
// `.bin` = tokens back to back, `.idx` = MMIDIDX header, int32 sizes, int64 byte pointers,
// int64 document indices. Also the bulk copies behind merge, subset and write_windows.
// Python owns the file names (temporary ones, renamed after finalize succeeds).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstdio>
#include <limits>
#include <memory>

#include "dispatch.h"
#include "mapped.h"

namespace py = pybind11;

namespace dsel {
namespace {

class Writer {
 public:
  Writer(std::string bin_path, std::string idx_path, int code)
      : bin_path_(std::move(bin_path)), idx_path_(std::move(idx_path)), code_(code), itemsize_(itemsize_of_code(code)) {
    with_code_type(code, bin_path_, [](auto) {});  // rejects float codes
    bin_ = std::fopen(bin_path_.c_str(), "wb");
    if (bin_ == nullptr) fail(bin_path_, std::string("cannot create (") + std::strerror(errno) + ")");
    std::setvbuf(bin_, nullptr, _IOFBF, 1 << 22);
  }
  ~Writer() { close_bin(); }

  // One sequence; values must fit the dataset dtype.
  void add_item(py::array tokens) {
    if (tokens.ndim() != 1) fail(bin_path_, "add_item expects a 1-D token array");
    auto flat = py::array::ensure(tokens, py::array::c_style);
    with_int_type(flat.dtype(), bin_path_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      write_sequence(static_cast<const S*>(flat.data()), flat.size());
    });
  }

  void end_document() { doc_index_.push_back(static_cast<int64_t>(sizes_.size())); }

  // Every document of `src` (same dtype), in order.
  void add_dataset(const IndexedData& src) {
    require_same_dtype(src);
    for (int64_t d = 0; d + 1 < src.num_doc_entries(); ++d) copy_document(src, d);
  }

  // Documents `ids` of `src`, in the given order (repeats allowed).
  void add_documents(const IndexedData& src, py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids) {
    require_same_dtype(src);
    const int64_t num_docs = src.num_doc_entries() - 1;
    const int64_t* p = ids.data();
    for (int64_t k = 0; k < ids.size(); ++k)
      if (p[k] < 0 || p[k] >= num_docs)
        fail(src.prefix(), "document id " + std::to_string(p[k]) + " out of range [0, " + std::to_string(num_docs) + ")");
    for (int64_t k = 0; k < ids.size(); ++k) copy_document(src, p[k]);
  }

  // Windows `ids` (tokens [i*window, (i+1)*window) of the flat stream), one document each.
  void add_windows(py::array stream, int64_t window, py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids) {
    if (window <= 0) fail(bin_path_, "window must be positive");
    if (stream.ndim() != 1 || !(stream.flags() & py::array::c_style)) fail(bin_path_, "the token stream must be a contiguous 1-D array");
    const int64_t num_windows = stream.size() / window;
    const int64_t* p = ids.data();
    for (int64_t k = 0; k < ids.size(); ++k)
      if (p[k] < 0 || p[k] >= num_windows)
        fail(bin_path_, "window id " + std::to_string(p[k]) + " out of range [0, " + std::to_string(num_windows) + ")");
    with_int_type(stream.dtype(), bin_path_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      const S* base = static_cast<const S*>(stream.data());
      for (int64_t k = 0; k < ids.size(); ++k) {
        write_sequence(base + p[k] * window, window);
        end_document();
      }
    });
  }

  // Flush the .bin and write the .idx; the writer is closed afterwards.
  void finalize() {
    if (bin_ == nullptr) fail(bin_path_, "writer already finalized");
    if (std::fflush(bin_) != 0 || std::ferror(bin_)) fail(bin_path_, std::string("write failed (") + std::strerror(errno) + ")");
    close_bin();
    write_index();
  }

  int64_t num_sequences() const { return static_cast<int64_t>(sizes_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(doc_index_.size()) - 1; }
  int64_t num_tokens() const { return bytes_ / itemsize_; }

 private:
  template <class S>
  void write_sequence(const S* src, int64_t n) {
    if (bin_ == nullptr) fail(bin_path_, "writer already finalized");
    if (n > std::numeric_limits<int32_t>::max()) fail(bin_path_, "sequence of " + std::to_string(n) + " tokens is too long");
    with_code_type(code_, bin_path_, [&](auto tag) {
      using O = typename decltype(tag)::type;
      check_fits<S, O>(src, n);
      O chunk[4096];
      for (int64_t done = 0; done < n; done += 4096) {
        const int64_t m = std::min<int64_t>(4096, n - done);
        copy_tokens(src + done, m, chunk);
        put(chunk, m * static_cast<int64_t>(sizeof(O)));
      }
    });
    sizes_.push_back(static_cast<int32_t>(n));
  }

  template <class S, class O>
  void check_fits(const S* src, int64_t n) const {
    if constexpr (!std::is_same_v<S, O>) {
      for (int64_t k = 0; k < n; ++k) {
        const S v = src[k];
        const bool below = std::is_signed_v<S> && static_cast<int64_t>(v) < static_cast<int64_t>(std::numeric_limits<O>::min());
        const bool above = !below && static_cast<uint64_t>(v) > static_cast<uint64_t>(std::numeric_limits<O>::max());
        if (below || above)
          fail(bin_path_, "token id " + std::to_string(v) + " does not fit the dataset dtype (code " + std::to_string(code_) + ")");
      }
    }
  }

  void copy_document(const IndexedData& src, int64_t d) {
    for (int64_t s = src.doc_index(d); s < src.doc_index(d + 1); ++s) {
      const int32_t len = src.size(s);
      put(src.bin().data() + src.pointer(s), static_cast<int64_t>(len) * itemsize_);
      sizes_.push_back(len);
    }
    end_document();
  }

  void require_same_dtype(const IndexedData& src) const {
    if (src.dtype_code() != code_)
      fail(src.prefix(), "dtype code " + std::to_string(src.dtype_code()) + " differs from the output's " + std::to_string(code_));
  }

  void put(const void* data, int64_t nbytes) {
    if (nbytes == 0) return;
    if (std::fwrite(data, 1, static_cast<size_t>(nbytes), bin_) != static_cast<size_t>(nbytes))
      fail(bin_path_, std::string("write failed (") + std::strerror(errno) + ")");
    bytes_ += nbytes;
  }

  void write_index() {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(idx_path_.c_str(), "wb"), std::fclose);
    if (!f) fail(idx_path_, std::string("cannot create (") + std::strerror(errno) + ")");
    const int64_t version = 1, n = num_sequences(), d = static_cast<int64_t>(doc_index_.size());
    const uint8_t code = static_cast<uint8_t>(code_);
    std::vector<int64_t> pointers(sizes_.size());
    int64_t ptr = 0;
    for (size_t i = 0; i < sizes_.size(); ++i) {
      pointers[i] = ptr;
      ptr += static_cast<int64_t>(sizes_[i]) * itemsize_;
    }
    bool ok = std::fwrite("MMIDIDX\0\0", 1, 9, f.get()) == 9;
    ok = ok && std::fwrite(&version, 8, 1, f.get()) == 1 && std::fwrite(&code, 1, 1, f.get()) == 1;
    ok = ok && std::fwrite(&n, 8, 1, f.get()) == 1 && std::fwrite(&d, 8, 1, f.get()) == 1;
    ok = ok && std::fwrite(sizes_.data(), 4, sizes_.size(), f.get()) == sizes_.size();
    ok = ok && std::fwrite(pointers.data(), 8, pointers.size(), f.get()) == pointers.size();
    ok = ok && std::fwrite(doc_index_.data(), 8, doc_index_.size(), f.get()) == doc_index_.size();
    ok = ok && std::fflush(f.get()) == 0;
    if (!ok) fail(idx_path_, std::string("write failed (") + std::strerror(errno) + ")");
  }

  void close_bin() {
    if (bin_ != nullptr) std::fclose(bin_);
    bin_ = nullptr;
  }

  std::string bin_path_, idx_path_;
  int code_;
  int64_t itemsize_;
  FILE* bin_ = nullptr;
  int64_t bytes_ = 0;
  std::vector<int32_t> sizes_;
  std::vector<int64_t> doc_index_{0};
};

}  // namespace

void bind_writer(py::module_& m) {
  py::class_<Writer>(m, "Writer", "Megatron .bin/.idx writer (use dsel.data.indexed.IndexedDatasetWriter)")
      .def(py::init<std::string, std::string, int>(), py::arg("bin_path"), py::arg("idx_path"), py::arg("dtype_code"))
      .def("add_item", &Writer::add_item)
      .def("end_document", &Writer::end_document)
      .def("add_dataset", &Writer::add_dataset)
      .def("add_documents", &Writer::add_documents)
      .def("add_windows", &Writer::add_windows)
      .def("finalize", &Writer::finalize)
      .def_property_readonly("num_sequences", &Writer::num_sequences)
      .def_property_readonly("num_documents", &Writer::num_documents)
      .def_property_readonly("num_tokens", &Writer::num_tokens);
}

}  // namespace dsel
