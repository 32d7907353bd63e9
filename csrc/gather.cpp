// Bindings of the mapped readers plus the hot loops: batched gathers of windows and of GPT
// samples into caller-owned buffers (GIL released), megatron-core's sample index, token checks.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>

#include "dispatch.h"
#include "mapped.h"

namespace py = pybind11;

namespace dsel {
namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

py::dtype dtype_of_code(int code) {
  static const char* names[] = {"", "u1", "i1", "i2", "i4", "i8", "f8", "f4", "u2"};
  return py::dtype(names[code]);
}

// A 1-D numpy view of `count` items at `data`, kept alive by `owner`.
py::array view(const py::dtype& dt, int64_t count, const uint8_t* data, py::handle owner) {
  static const uint8_t empty[8] = {};
  return py::array(dt, {count}, {dt.itemsize()}, data != nullptr ? data : empty, owner);
}

void require_stream(const py::array& stream, const char* what) {
  if (stream.ndim() != 1 || !(stream.flags() & py::array::c_style))
    throw FormatError(std::string(what) + ": the token stream must be a contiguous 1-D array");
}

void require_out(const py::array& out, int64_t rows, int64_t cols, const char* what) {
  if (out.ndim() != 2 || out.shape(0) != rows || out.shape(1) != cols || !(out.flags() & py::array::c_style) ||
      !out.writeable())
    throw FormatError(std::string(what) + ": out must be a writable C-contiguous array of shape [" + std::to_string(rows) +
                      ", " + std::to_string(cols) + "]");
}

// out[b] = stream[ids[b]*window : (ids[b]+1)*window] for every b; ids checked first.
void gather_windows(py::array stream, int64_t window, Int64Array ids, py::array out) {
  require_stream(stream, "gather_windows");
  if (window <= 0) throw FormatError("gather_windows: window must be positive");
  const int64_t batch = ids.size(), num_windows = stream.size() / window;
  require_out(out, batch, window, "gather_windows");
  const int64_t* id = ids.data();
  for (int64_t b = 0; b < batch; ++b)
    if (id[b] < 0 || id[b] >= num_windows)
      throw FormatError("gather_windows: window id " + std::to_string(id[b]) + " out of range [0, " +
                        std::to_string(num_windows) + ")");
  with_int_type(stream.dtype(), "gather_windows", [&](auto stag) {
    with_int_type(out.dtype(), "gather_windows", [&](auto otag) {
      using S = typename decltype(stag)::type;
      using O = typename decltype(otag)::type;
      const S* src = static_cast<const S*>(stream.data());
      O* dst = static_cast<O*>(out.mutable_data());
      py::gil_scoped_release release;
      for (int64_t b = 0; b < batch; ++b) copy_tokens(src + id[b] * window, window, dst + b * window);
    });
  });
}

// The (document index, sample index, shuffle index) triple of one megatron-core GPTDataset.
struct SampleTables {
  const int64_t* doc;      // position -> sequence id
  int64_t num_doc;
  const int64_t* sample;   // [num_samples + 1, 2]: (position in doc, token offset)
  int64_t num_samples;
  const int64_t* shuffle;  // sample order
  int64_t num_shuffle;
};

// Copies sample shuffle[id] (seq_len + 1 tokens) like GPTDataset._query_document_sample_shuffle_indices.
template <class S, class O>
void copy_sample(const IndexedData& ds, const S* tokens, const SampleTables& t, int64_t id, int64_t length, O* out) {
  const std::string& path = ds.idx().path();
  if (id < 0 || id >= t.num_shuffle) fail(path, "sample " + std::to_string(id) + " out of range [0, " + std::to_string(t.num_shuffle) + ")");
  const int64_t j = t.shuffle[id];
  if (j < 0 || j >= t.num_samples) fail(path, "shuffle index entry " + std::to_string(j) + " out of range");
  const int64_t d0 = t.sample[2 * j], o0 = t.sample[2 * j + 1], d1 = t.sample[2 * j + 2], o1 = t.sample[2 * j + 3];
  if (d0 < 0 || d1 < d0 || d1 >= t.num_doc) fail(path, "sample index inconsistent with the document index");
  int64_t pos = 0;
  for (int64_t d = d0; d <= d1; ++d) {
    const int64_t seq = t.doc[d];
    if (seq < 0 || seq >= ds.num_sequences()) fail(path, "document index entry " + std::to_string(seq) + " out of range");
    const int64_t begin = d == d0 ? o0 : 0, end = d == d1 ? o1 + 1 : ds.size(seq);
    if (begin < 0 || end < begin || end > ds.size(seq) || pos + end - begin > length)
      fail(path, "sample index inconsistent with sequence lengths (sample " + std::to_string(j) + ")");
    copy_tokens(tokens + ds.token_start(seq) + begin, end - begin, out + pos);
    pos += end - begin;
  }
  if (pos != length) fail(path, "sample " + std::to_string(j) + " has " + std::to_string(pos) + " tokens, expected " + std::to_string(length));
}

// out[b] = GPT sample ids[b] (seq_len + 1 tokens) for every b.
void gather_samples(const IndexedData& ds, Int64Array doc, Int64Array sample, Int64Array shuffle, Int64Array ids,
                    int64_t seq_len, py::array out) {
  const int64_t batch = ids.size(), length = seq_len + 1;
  require_out(out, batch, length, "gather_samples");
  if (sample.ndim() != 2 || sample.shape(1) != 2 || sample.shape(0) < 1)
    throw FormatError("gather_samples: the sample index must have shape [num_samples + 1, 2]");
  SampleTables t{doc.data(), doc.size(), sample.data(), sample.shape(0) - 1, shuffle.data(), shuffle.size()};
  const int64_t* id = ids.data();
  with_code_type(ds.dtype_code(), ds.idx().path(), [&](auto stag) {
    with_int_type(out.dtype(), "gather_samples", [&](auto otag) {
      using S = typename decltype(stag)::type;
      using O = typename decltype(otag)::type;
      const S* tokens = reinterpret_cast<const S*>(ds.bin().data());
      O* dst = static_cast<O*>(out.mutable_data());
      py::gil_scoped_release release;
      for (int64_t b = 0; b < batch; ++b) copy_sample(ds, tokens, t, id[b], length, dst + b * length);
    });
  });
}

// megatron-core helpers.cpp build_sample_idx (drop_last_partial_sequence=True,
// add_extra_token_to_sequence=1), always int64: row k = (position in doc, offset) where sample k starts.
py::array_t<int64_t> build_sample_idx(const IndexedData& ds, Int64Array doc, int32_t seq_len, int32_t num_epochs,
                                      int64_t tokens_per_epoch) {
  const std::string& path = ds.idx().path();
  if (seq_len <= 1 || num_epochs <= 0 || tokens_per_epoch <= 1)
    fail(path, "cannot build a sample index (seq_len " + std::to_string(seq_len) + ", " + std::to_string(tokens_per_epoch) +
                   " tokens per epoch)");
  const int64_t num_docs = doc.size();
  const int64_t* d = doc.data();
  for (int64_t k = 0; k < num_docs; ++k)
    if (d[k] < 0 || d[k] >= ds.num_sequences()) fail(path, "document index entry " + std::to_string(d[k]) + " out of range");
  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_len;
  py::array_t<int64_t> result({num_samples + 1, int64_t(2)});
  int64_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t row = 0, doc_pos = 0, offset = 0;
    out[0] = 0;
    out[1] = 0;
    ++row;
    while (row <= num_samples) {
      int64_t remaining = seq_len + 1;
      while (remaining != 0) {
        const int64_t doc_length = ds.size(d[doc_pos]) - offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          if (doc_pos == num_docs - 1) {
            if (row != num_samples) fail(path, "sample index ran out of documents (tokens_per_epoch too large?)");
            offset = ds.size(d[doc_pos]) - 1;
            break;
          }
          ++doc_pos;
          offset = 0;
        }
      }
      out[2 * row] = doc_pos;
      out[2 * row + 1] = offset;
      ++row;
    }
  }
  return result;
}

// Position of the first token outside [0, vocab_size), or -1 when every token is valid.
int64_t first_token_outside(py::array stream, int64_t vocab_size) {
  require_stream(stream, "check_tokens");
  return with_int_type(stream.dtype(), "check_tokens", [&](auto tag) -> int64_t {
    using S = typename decltype(tag)::type;
    const S* p = static_cast<const S*>(stream.data());
    const int64_t n = stream.size();
    py::gil_scoped_release release;
    constexpr int64_t kBlock = 1 << 16;
    for (int64_t start = 0; start < n; start += kBlock) {
      const int64_t end = std::min(n, start + kBlock);
      bool bad = false;  // branch-free scan of a block, then locate
      for (int64_t k = start; k < end; ++k) bad |= static_cast<int64_t>(p[k]) < 0 || static_cast<int64_t>(p[k]) >= vocab_size;
      if (bad)
        for (int64_t k = start; k < end; ++k)
          if (static_cast<int64_t>(p[k]) < 0 || static_cast<int64_t>(p[k]) >= vocab_size) return k;
    }
    return -1;
  });
}

// Positions (ascending) of every token equal to `value`: document ends in a headerless stream.
py::array_t<int64_t> token_positions(py::array stream, int64_t value) {
  require_stream(stream, "token_positions");
  std::vector<int64_t> found;
  with_int_type(stream.dtype(), "token_positions", [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S* p = static_cast<const S*>(stream.data());
    const int64_t n = stream.size();
    py::gil_scoped_release release;
    for (int64_t k = 0; k < n; ++k)
      if (static_cast<int64_t>(p[k]) == value) found.push_back(k);
  });
  py::array_t<int64_t> result(static_cast<py::ssize_t>(found.size()));
  std::copy(found.begin(), found.end(), result.mutable_data());
  return result;
}

}  // namespace

void bind_gather(py::module_& m) {
  py::class_<IndexedData, std::shared_ptr<IndexedData>>(m, "IndexedData", "Validated, memory-mapped Megatron .idx/.bin pair")
      .def(py::init<std::string>(), py::arg("prefix"))
      .def_property_readonly("prefix", &IndexedData::prefix)
      .def_property_readonly("dtype_code", &IndexedData::dtype_code)
      .def_property_readonly("num_sequences", &IndexedData::num_sequences)
      .def_property_readonly("num_tokens", &IndexedData::num_tokens)
      .def_property_readonly("contiguous", &IndexedData::contiguous)
      .def("sizes", [](py::object self) {
        auto& d = self.cast<IndexedData&>();
        return view(py::dtype("i4"), d.num_sequences(), d.idx().data() + d.sizes_offset(), self);
      })
      .def("pointers", [](py::object self) {
        auto& d = self.cast<IndexedData&>();
        return view(py::dtype("i8"), d.num_sequences(), d.idx().data() + d.pointers_offset(), self);
      })
      .def("document_indices", [](py::object self) {
        auto& d = self.cast<IndexedData&>();
        return view(py::dtype("i8"), d.num_doc_entries(), d.idx().data() + d.docs_offset(), self);
      })
      .def("tokens", [](py::object self) {
        auto& d = self.cast<IndexedData&>();
        return view(dtype_of_code(d.dtype_code()), d.bin().size() / d.itemsize(), d.bin().data(), self);
      }, "every token of the .bin file as one read-only array (a view)");

  py::class_<RawTokens, std::shared_ptr<RawTokens>>(m, "RawTokens", "Memory-mapped headerless uint16/uint32 token file")
      .def(py::init<std::string, int64_t>(), py::arg("path"), py::arg("itemsize"))
      .def_property_readonly("num_tokens", &RawTokens::num_tokens)
      .def("tokens", [](py::object self) {
        auto& r = self.cast<RawTokens&>();
        return view(py::dtype(r.itemsize() == 2 ? "u2" : "u4"), r.num_tokens(), r.file().data(), self);
      });

  m.def("gather_windows", &gather_windows, py::arg("stream"), py::arg("window"), py::arg("ids"), py::arg("out"));
  m.def("gather_samples", &gather_samples, py::arg("dataset"), py::arg("document_index"), py::arg("sample_index"),
        py::arg("shuffle_index"), py::arg("ids"), py::arg("seq_len"), py::arg("out"));
  m.def("build_sample_idx", &build_sample_idx, py::arg("dataset"), py::arg("document_index"), py::arg("seq_len"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"));
  m.def("first_token_outside", &first_token_outside, py::arg("stream"), py::arg("vocab_size"));
  m.def("token_positions", &token_positions, py::arg("stream"), py::arg("value"));
}

}  // namespace dsel
