// Read-only memory-mapped files, the Megatron indexed dataset reader and the FormatError that
// every malformed input turns into (pybind maps it to dsel._C.FormatError; Python wraps it in
// DselError). All validation happens here, once, so the hot gather loops can trust the index.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace dsel {

// Bad input: the message always starts with the offending file's path.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& path, const std::string& problem);

// Unaligned little-endian load (the .idx arrays start at byte 34, so int32/int64 are unaligned).
template <class T>
inline T load(const uint8_t* base, int64_t i) {
  T v;
  std::memcpy(&v, base + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}

// A whole file mapped read-only (an empty file maps to nullptr, size 0).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

// Megatron dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.
int64_t itemsize_of_code(int code);  // 0 for an unknown code

// Megatron MMIDIDX dataset: `prefix.idx` (header + sizes + pointers + document indices) and
// `prefix.bin` (raw tokens). The constructor checks everything a reader could trip on.
class IndexedData {
 public:
  explicit IndexedData(const std::string& prefix);

  const std::string& prefix() const { return prefix_; }
  int dtype_code() const { return code_; }
  int64_t itemsize() const { return itemsize_; }
  int64_t num_sequences() const { return n_; }
  int64_t num_doc_entries() const { return d_; }
  int64_t num_tokens() const { return num_tokens_; }
  // True when sequence i starts right where i-1 ends (every writer we know produces this).
  bool contiguous() const { return contiguous_; }

  int32_t size(int64_t i) const { return load<int32_t>(sizes_, i); }
  int64_t pointer(int64_t i) const { return load<int64_t>(pointers_, i); }
  int64_t doc_index(int64_t i) const { return load<int64_t>(docs_, i); }
  // Token offset of sequence i inside the .bin token array.
  int64_t token_start(int64_t i) const { return pointer(i) / itemsize_; }

  const MappedFile& idx() const { return idx_; }
  const MappedFile& bin() const { return bin_; }
  int64_t sizes_offset() const { return 34; }
  int64_t pointers_offset() const { return 34 + 4 * n_; }
  int64_t docs_offset() const { return 34 + 12 * n_; }

 private:
  void check_header();
  void check_documents();
  void check_sequences();

  std::string prefix_;
  MappedFile idx_;
  MappedFile bin_;
  int code_ = 0;
  int64_t itemsize_ = 0;
  int64_t n_ = 0;
  int64_t d_ = 0;
  int64_t num_tokens_ = 0;
  bool contiguous_ = true;
  const uint8_t* sizes_ = nullptr;
  const uint8_t* pointers_ = nullptr;
  const uint8_t* docs_ = nullptr;
};

// A headerless token file (OLMo / dolma memmap): raw uint16 or uint32 tokens, nothing else.
class RawTokens {
 public:
  RawTokens(const std::string& path, int64_t itemsize);
  const MappedFile& file() const { return file_; }
  int64_t itemsize() const { return itemsize_; }
  int64_t num_tokens() const { return file_.size() / itemsize_; }

 private:
  MappedFile file_;
  int64_t itemsize_;
};

}  // namespace dsel
